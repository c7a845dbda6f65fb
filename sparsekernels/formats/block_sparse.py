"""BlockSparseTensor: a block-sparse (BSR) matrix [N, K] with blocks of (bm, bk).

Storage (all on one device):
  values          [nnz, bm, bk]  the stored blocks, row-major block order
  crow_indices    [N/bm + 1]     int32, block-row pointers into values
  col_indices     [nnz]          int32, block column of each stored block
  row_indices     [nnz]          int32, block row of each stored block (COO rows)
  ccol_indices    [K/bk + 1]     int32, block-column pointers of the transposed order
  row_indices_t   [nnz]          int32, block row of each block in column-major order
  transpose_perm  [nnz]          int32, values index of each block in column-major order

The transposed index is what the input gradient (grad @ W, a dense x sparse product over
block columns) needs, so it is built once here instead of on every backward.

An index that comes from outside (a checkpoint, a pickle, `from_parts`) is checked once by
`validate_index`; the kernels then trust it (they index memory with it unchecked).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sparsekernels.ops.limits import SUPPORTED_BLOCK_SIZES, check_block_size

INDEX_NAMES = ("crow_indices", "col_indices", "row_indices", "ccol_indices", "row_indices_t",
               "transpose_perm")
INNER_NAMES = ("values",) + INDEX_NAMES


def inner_tensors(obj) -> tuple:
    """The stored blocks and index of a BlockSparseTensor (or a SparseLinear), in the order
    the sparsekernels ops take them."""
    return tuple(getattr(obj, name) for name in INNER_NAMES)


def check_divisible(shape, block_size, what: str = "weight") -> None:
    n, k = shape
    bm, bk = block_size
    if n % bm or k % bk:
        raise ValueError(
            f"{what} of shape [{n}, {k}] is not divisible by block size ({bm}, {bk}): "
            f"choose a block size that divides both dimensions (out {n} by {bm}, in {k} by {bk})"
            ", or leave this layer dense")


def _blocks(dense: torch.Tensor, block_size) -> torch.Tensor:
    """[N, K] -> [N/bm, K/bk, bm, bk] view-and-permute (no copy)."""
    (n, k), (bm, bk) = dense.shape, block_size
    return dense.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)


def block_mask_from_mask(mask: torch.Tensor, block_size) -> torch.Tensor:
    """Element mask [N, K] -> bool block mask: a block is kept when any element is kept."""
    return _blocks(mask != 0, block_size).any(dim=-1).any(dim=-1)


def units_to_prune(num_units: int, sparsity: float) -> int:
    """How many of `num_units` a sparsity prunes: ``floor(sparsity * num_units + 0.5)``
    (round half up). The one rule: the pruners and SparseLinear.from_linear(sparsity=) both
    use it, so they keep the same number of blocks."""
    return int(math.floor(float(sparsity) * num_units + 0.5))


def block_density(nnz: int, shape, block_size) -> float:
    """Stored blocks over the blocks of the grid: a block-sparse weight's density."""
    (bm, bk), (out_f, in_f) = block_size, shape
    return nnz / max(1, (out_f // bm) * (in_f // bk))


def topk_block_mask(weight: torch.Tensor, block_size, sparsity: float) -> torch.Tensor:
    """Keep the blocks of largest L2 norm, all but units_to_prune(n_blocks, sparsity)."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    norms = _blocks(weight.detach().float(), block_size).pow(2).sum(dim=(-1, -2))
    n_keep = norms.numel() - units_to_prune(norms.numel(), sparsity)
    flat = torch.zeros(norms.numel(), dtype=torch.bool, device=weight.device)
    if n_keep > 0:
        # stable sort: ties keep the lower block index, so the mask is deterministic
        order = torch.sort(norms.flatten(), descending=True, stable=True).indices
        flat[order[:n_keep]] = True
    return flat.view_as(norms)


def build_index(block_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The six int32 index arrays of a bool block mask [N/bm, K/bk]."""
    nbr, nbc = block_mask.shape
    rows, cols = block_mask.nonzero(as_tuple=True)  # row-major order
    crow = torch.zeros(nbr + 1, dtype=torch.int64, device=block_mask.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=nbr), 0)
    ccol = torch.zeros(nbc + 1, dtype=torch.int64, device=block_mask.device)
    ccol[1:] = torch.cumsum(torch.bincount(cols, minlength=nbc), 0)
    perm = torch.sort(cols * nbr + rows, stable=True).indices
    i32 = lambda t: t.to(torch.int32).contiguous()
    return {"crow_indices": i32(crow), "col_indices": i32(cols), "row_indices": i32(rows),
            "ccol_indices": i32(ccol), "row_indices_t": i32(rows[perm]),
            "transpose_perm": i32(perm)}


class InvalidIndexError(ValueError):
    """A block-sparse index (or its stored blocks) that does not describe a valid matrix."""


def is_binary_mask(mask: torch.Tensor) -> bool:
    """True when every entry is 0 or 1 (bool masks always are; 0.5 and NaN are not): the one
    rule for what a mask may hold, shared with the pruners' mask checks."""
    if mask.dtype == torch.bool:
        return True
    return bool(((mask == 0) | (mask == 1)).all())


def validate_index(values, index, shape, name: str = "BlockSparseTensor") -> None:
    """Raise InvalidIndexError unless `values` and `index` describe a block-sparse matrix of
    `shape` [N, K] exactly as `build_index` would have built it: blocks of a supported size
    dividing the shape, six contiguous 1-D int32 arrays on the values' device, row pointers
    from 0 to nnz without decreasing, columns in range and strictly increasing within each
    block row, and the row / transposed arrays consistent with them.

    Everything after the format checks is computed with a handful of vectorised ops and two
    host syncs (it runs once per load, not per call). `name` prefixes the message (the module
    or tensor the index belongs to)."""

    def fail(part: str, message: str):
        raise InvalidIndexError(f"{name}.{part}: {message}")

    if not isinstance(values, torch.Tensor):
        fail("values", f"expected a tensor, got {type(values).__name__}")
    if values.dim() != 3:
        fail("values", f"must have shape [nnz, bm, bk], got {list(values.shape)}")
    if not values.is_floating_point():
        fail("values", f"must be a floating-point tensor, got {values.dtype}")
    if values.shape[1] not in SUPPORTED_BLOCK_SIZES or values.shape[2] not in SUPPORTED_BLOCK_SIZES:
        fail("values", f"block size {tuple(values.shape[1:])} is not supported: each side must "
                       f"be one of {SUPPORTED_BLOCK_SIZES}")
    try:
        n, k = (int(d) for d in shape)
    except (TypeError, ValueError):
        raise InvalidIndexError(f"{name}: shape must be [N, K], got {shape!r}") from None
    bm, bk = int(values.shape[1]), int(values.shape[2])
    if n < 0 or k < 0 or n % bm or k % bk:
        fail("values", f"block size ({bm}, {bk}) does not divide the matrix shape [{n}, {k}]")
    nbr, nbc, nnz = n // bm, k // bk, int(values.shape[0])
    if nnz > nbr * nbc:
        fail("values", f"holds {nnz} blocks, more than the {nbr * nbc} of a [{n}, {k}] matrix")
    if not isinstance(index, Mapping):
        raise InvalidIndexError(f"{name}: index must be a dict of {INDEX_NAMES}, got "
                                f"{type(index).__name__}")
    lengths = {"crow_indices": (nbr + 1, f"N/bm + 1 = {n}/{bm} + 1"),
               "ccol_indices": (nbc + 1, f"K/bk + 1 = {k}/{bk} + 1")}
    for part in INDEX_NAMES:
        t = index.get(part)
        if not isinstance(t, torch.Tensor):
            fail(part, "missing" if t is None else f"expected a tensor, got {type(t).__name__}")
        length, why = lengths.get(part, (nnz, "nnz, the number of blocks in values"))
        if t.dtype != torch.int32:
            fail(part, f"must be int32, got {t.dtype}")
        if t.dim() != 1 or t.numel() != length:
            fail(part, f"must be 1-D of length {length} ({why}), got shape {list(t.shape)}")
        if not t.is_contiguous():
            fail(part, "must be contiguous")
        if t.device != values.device:
            fail(part, f"is on {t.device}, values on {values.device}: keep the index and the "
                       "blocks on one device")
    if values.device.type == "meta":
        return  # nothing to read
    crow = index["crow_indices"].long()
    col = index["col_indices"].long()
    # stage 1: what the rest relies on (row pointers from 0 to nnz, never decreasing)
    counts = crow.diff()
    ok = torch.stack([crow[0] == 0, (counts >= 0).all(), crow[-1] == nnz,
                      ((col >= 0) & (col < nbc)).all()]).tolist()
    messages = ["must start at 0", "must not decrease (row pointers)",
                f"must end at nnz = {nnz} (the number of blocks in values)", None]
    for good, part, message in zip(ok, ("crow_indices",) * 3 + ("col_indices",), messages):
        if not good:
            fail(part, message or f"entries must lie in [0, {nbc}) (K/bk = {k}/{bk})")
    # stage 2: crow and col fix the set of stored blocks, and the other four arrays are
    # functions of that set: compare each with what build_index makes of it.
    # Block row of each stored block (searchsorted: repeat_interleave costs milliseconds).
    rows = torch.searchsorted(crow[1:], torch.arange(nnz, device=crow.device), right=True)
    same_row = rows[1:] == rows[:-1]
    perm = torch.sort(col * nbr + rows, stable=True).indices
    ccol = torch.zeros(nbc + 1, dtype=torch.long, device=col.device)
    ccol[1:] = torch.cumsum(torch.bincount(col, minlength=nbc), 0)
    given_perm = index["transpose_perm"].long()
    is_perm = (torch.bincount(given_perm.clamp(0, max(nnz - 1, 0)), minlength=nnz) == 1).all() & (
        (given_perm >= 0) & (given_perm < nnz)).all()
    ok = torch.stack([
        ~(same_row & (col[1:] <= col[:-1])).any(),
        (index["row_indices"].long() == rows).all(),
        (index["ccol_indices"].long() == ccol).all(),
        is_perm,
        (given_perm == perm).all(),
        (index["row_indices_t"].long() == rows[perm]).all(),
    ]).tolist()
    messages = [("col_indices", "must be strictly increasing within each block row that "
                                "crow_indices delimits (sorted, no duplicate blocks)"),
                ("row_indices", "disagrees with crow_indices (block row of each stored block)"),
                ("ccol_indices", "disagrees with col_indices (column pointers of the transposed "
                                 "order)"),
                ("transpose_perm", f"is not a permutation of 0..{nnz - 1}"),
                ("transpose_perm", "is not the column-major order of the blocks that "
                                   "crow_indices and col_indices describe"),
                ("row_indices_t", "disagrees with the column-major order of the blocks that "
                                  "crow_indices and col_indices describe")]
    for good, (part, message) in zip(ok, messages):
        if not good:
            fail(part, message)


class BlockSparseTensor(torch.Tensor):
    """A block-sparse matrix that behaves as a tensor of shape [N, K].

    It passes through `torch.compile` (flatten/unflatten), `.to(device)`, `.half()`,
    `.detach()`, `.clone()` and pickling; `F.linear(x, w)` with a BlockSparseTensor `w`
    runs `sparsekernels.sparse_linear`. Other operations need `.to_dense()` first.
    """

    values: torch.Tensor
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    row_indices: torch.Tensor
    ccol_indices: torch.Tensor
    row_indices_t: torch.Tensor
    transpose_perm: torch.Tensor

    @staticmethod
    def __new__(cls, values, crow_indices, col_indices, row_indices, ccol_indices,
                row_indices_t, transpose_perm, shape, requires_grad=False, check_index=True):
        # check_index=False only for an index this package built or checked already (views
        # of a layer's own buffers, from_dense, torch.compile's unflatten): it runs per call
        if check_index:
            validate_index(values, {"crow_indices": crow_indices, "col_indices": col_indices,
                                    "row_indices": row_indices, "ccol_indices": ccol_indices,
                                    "row_indices_t": row_indices_t,
                                    "transpose_perm": transpose_perm}, shape)
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=values.dtype, device=values.device,
            requires_grad=requires_grad)

    def __init__(self, values, crow_indices, col_indices, row_indices, ccol_indices,
                 row_indices_t, transpose_perm, shape, requires_grad=False, check_index=True):
        self.values = values
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.row_indices = row_indices
        self.ccol_indices = ccol_indices
        self.row_indices_t = row_indices_t
        self.transpose_perm = transpose_perm

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_size=(32, 32),
                   mask: torch.Tensor | None = None) -> "BlockSparseTensor":
        """Store the blocks of `weight` [N, K] that `mask` keeps.

        mask: None (store every block holding a non-zero), an element mask [N, K]
        (blocks with any kept element are stored, masked elements set to zero) or a block
        mask [N/bm, K/bk]. `to_dense()` gives back weight * mask exactly.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("from_dense expects a 2-D weight [out_features, in_features], got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        bm, bk = check_block_size(block_size)
        check_divisible(weight.shape, (bm, bk))
        weight = weight.detach()
        nb = (weight.shape[0] // bm, weight.shape[1] // bk)
        if mask is None:
            block_mask = block_mask_from_mask(weight, (bm, bk))
        else:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
            if mask.device != weight.device:
                raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}: "
                                 "move the mask with .to(weight.device)")
            if not is_binary_mask(mask):
                raise ValueError("mask holds values other than 0 and 1 (e.g. 0.5 or NaN): pass a "
                                 "0/1 or bool mask (round or threshold a soft mask first)")
            if tuple(mask.shape) == tuple(weight.shape):
                weight = weight * (mask != 0).to(weight.dtype)
                block_mask = block_mask_from_mask(mask, (bm, bk))
            elif tuple(mask.shape) == nb:
                block_mask = mask != 0
            else:
                raise ValueError(
                    f"mask of shape {list(mask.shape)} fits neither the weight {list(weight.shape)} "
                    f"(element mask) nor its block grid {list(nb)} (block mask)")
        values = _blocks(weight, (bm, bk))[block_mask].contiguous()
        index = build_index(block_mask)
        return cls(values, **index, shape=weight.shape, check_index=False)

    @classmethod
    def from_parts(cls, values, index: dict, shape) -> "BlockSparseTensor":
        """From stored blocks and the six index arrays (checked: see validate_index)."""
        validate_index(values, index, shape)
        return cls(values, **{name: index[name] for name in INDEX_NAMES}, shape=shape,
                   check_index=False)

    # -- properties ---------------------------------------------------------------------
    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def block_grid(self) -> tuple[int, int]:
        bm, bk = self.block_size
        return self.shape[0] // bm, self.shape[1] // bk

    @property
    def density(self) -> float:
        nbr, nbc = self.block_grid
        return self.nnz_blocks / max(1, nbr * nbc)

    def index(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in INDEX_NAMES}

    def block_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.block_grid, dtype=torch.bool, device=self.values.device)
        mask[self.row_indices.long(), self.col_indices.long()] = True
        return mask

    def to_dense(self) -> torch.Tensor:
        from sparsekernels.ops.reference.bsr_linear import bsr_to_dense

        return bsr_to_dense(self.values, self.row_indices, self.col_indices, self.shape)

    def __repr__(self):
        return (f"BlockSparseTensor(shape={list(self.shape)}, block_size={self.block_size}, "
                f"nnz_blocks={self.nnz_blocks}, density={self.density:.3f}, "
                f"dtype={self.dtype}, device={self.device})")

    # -- tensor subclass protocol -------------------------------------------------------
    def __tensor_flatten__(self):
        return list(INNER_NAMES), (tuple(self.shape),)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        (shape,) = meta
        return BlockSparseTensor(*(inner[name] for name in INNER_NAMES), shape=shape,
                                 check_index=False)

    def __reduce_ex__(self, protocol):
        return (_rebuild, (inner_tensors(self), tuple(self.shape)))

    def _with_values(self, values, index_fn=lambda t: t):
        return BlockSparseTensor(values, *(index_fn(getattr(self, n)) for n in INDEX_NAMES),
                                 shape=self.shape, check_index=False)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            from sparsekernels.formats.functional import sparse_linear

            return sparse_linear(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        self = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return self._with_values(func(self.values))
        if func is aten.clone.default:
            return self._with_values(self.values.clone(), lambda t: t.clone())
        if func is aten._to_copy.default:
            device = kwargs.get("device")
            # the index stays int32; only the device follows
            values = func(self.values, **kwargs)
            return self._with_values(values, lambda t: t.to(device) if device is not None else t)
        if func is aten.copy_.default:
            src = args[1]
            if not isinstance(src, BlockSparseTensor) or not all(
                    torch.equal(getattr(self, n).cpu(), getattr(src, n).cpu()) for n in INDEX_NAMES):
                raise RuntimeError("copy_ into a BlockSparseTensor needs a source with the same "
                                   "block layout; build a new one with BlockSparseTensor.from_dense")
            self.values.copy_(src.values)
            return self
        if func in (aten.is_same_size.default,):
            return self.shape == args[1].shape
        raise NotImplementedError(
            f"BlockSparseTensor does not support {func}: call .to_dense() first, or use "
            "sparsekernels.sparse_linear / F.linear for the product")


def _rebuild(inner, shape):
    # unpickling: the index comes from outside, so the constructor checks it
    return BlockSparseTensor(*inner, shape=shape)
