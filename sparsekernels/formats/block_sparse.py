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
"""

from __future__ import annotations

import math

import torch

from sparsekernels.ops.limits import check_block_size

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
                row_indices_t, transpose_perm, shape, requires_grad=False):
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=values.dtype, device=values.device,
            requires_grad=requires_grad)

    def __init__(self, values, crow_indices, col_indices, row_indices, ccol_indices,
                 row_indices_t, transpose_perm, shape, requires_grad=False):
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
            if mask.device != weight.device:
                raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}: "
                                 "move the mask with .to(weight.device)")
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
        return cls(values, **index, shape=weight.shape)

    @classmethod
    def from_parts(cls, values, index: dict, shape) -> "BlockSparseTensor":
        return cls(values, **{name: index[name] for name in INDEX_NAMES}, shape=shape)

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
        return BlockSparseTensor(*(inner[name] for name in INNER_NAMES), shape=shape)

    def __reduce_ex__(self, protocol):
        return (_rebuild, (inner_tensors(self), tuple(self.shape)))

    def _with_values(self, values, index_fn=lambda t: t):
        return BlockSparseTensor(values, *(index_fn(getattr(self, n)) for n in INDEX_NAMES),
                                 shape=self.shape)

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
    return BlockSparseTensor(*inner, shape=shape)
