"""SparseLinear: an nn.Linear whose weight is block-sparse, and sparsify_ to swap them in.

The stored blocks are a plain Parameter `values` [nnz, bm, bk] and the layout lives in
int32 buffers, so optimizers, state_dict, `.to()` and torch.compile all see ordinary
tensors; `.weight` gives the same storage as a BlockSparseTensor.

On the CPU each block of `values` is stored transposed in memory (strides [bm*bk, 1, bm]):
`values.transpose(1, 2)` is then a contiguous view, the W.T blocks the C++ kernel reads, so
no call ever packs or caches a copy of the weights (a cache could serve stale weights after
a fused optimizer step, which does not bump version counters). Elsewhere (CUDA, Triton)
the blocks are row-major. The logical shape, the state_dict and every result are the same.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn

from sparsekernels.formats.block_sparse import (
    block_density,
    INDEX_NAMES,
    INNER_NAMES,
    BlockSparseTensor,
    InvalidIndexError,
    build_index,
    check_block_size,
    check_divisible,
    inner_tensors,
    topk_block_mask,
    validate_index,
)
from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.bsr_linear import direct_linear, linear_packed
from sparsekernels.ops.eager import _MODE_STACKS
from sparsekernels.ops.router import Route, route


def blocks_for(device: torch.device) -> str:
    """How a device's kernels want the blocks laid out in memory: "transposed" on the CPU
    (the C++ kernel reads W.T blocks), "rows" elsewhere."""
    return "transposed" if torch.device(device).type == "cpu" else "rows"


def lay_out(values: torch.Tensor) -> torch.Tensor:
    """`values` [nnz, bm, bk] with the memory layout its device's kernels read (a copy only
    when the layout changes)."""
    if blocks_for(values.device) == "transposed":
        if values.transpose(1, 2).is_contiguous():
            return values
        return values.transpose(1, 2).contiguous().transpose(1, 2)
    return values.contiguous()


def _needs_grad(x: torch.Tensor, layer: "SparseLinear") -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or layer.values.requires_grad
        or (layer.bias is not None and layer.bias.requires_grad))


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W [out_features, in_features] stored as (bm, bk) blocks.

    backend: "auto" lets the router (sparsekernels.ops.router) pick the kernel for the
    layer's device and dtype, and plain dense F.linear when the block density is above the
    measured crossover; "cpu", "cuda", "triton" or "reference" force one. The route is made
    when the layer is built, moved (`.to()`) or loaded, reading SPARSEKERNELS_BACKEND then;
    `reroute()` makes it again (after changing that variable, say).
    """

    values: torch.Tensor

    def __init__(self, in_features: int, out_features: int, block_size=(32, 32), bias: bool = True,
                 block_mask: torch.Tensor | None = None, backend: "Backend | str" = "auto",
                 device=None, dtype=None):
        super().__init__()
        bm, bk = check_block_size(block_size)
        check_divisible((out_features, in_features), (bm, bk), "SparseLinear weight")
        grid = (out_features // bm, in_features // bk)
        if block_mask is None:
            block_mask = torch.ones(grid, dtype=torch.bool, device=device)
        if tuple(block_mask.shape) != grid:
            raise ValueError(f"block_mask must have shape {list(grid)} (the block grid), got "
                             f"{list(block_mask.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = (bm, bk)
        self._backend = Backend.parse(backend)
        index = build_index(block_mask.to(device=device, dtype=torch.bool))
        for name in INDEX_NAMES:
            self.register_buffer(name, index[name])
        nnz = int(index["col_indices"].numel())
        self.values = nn.Parameter(self._empty_values(nnz, device, dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.reroute()

    def _empty_values(self, nnz: int, device, dtype) -> torch.Tensor:
        bm, bk = self.block_size
        values = torch.empty(nnz, bm, bk, device=device, dtype=dtype)
        return lay_out(values)

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, restricted to the stored blocks
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    # -- conversion -----------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size=(32, 32), sparsity: float | None = None,
                    mask: torch.Tensor | None = None, backend: "Backend | str" = "auto") -> "SparseLinear":
        """A SparseLinear computing what `linear` computes once pruned.

        sparsity: keep the blocks of largest L2 norm, as many as the block pruner keeps at
        this sparsity (see formats.block_sparse.units_to_prune).
        mask: an element 0/1 mask [out, in] (NNI style): every block holding a kept element
        is stored with the masked elements zero, so the output equals the masked Linear's.
        Neither: store the blocks that hold any non-zero weight.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if sparsity is not None and mask is not None:
            raise ValueError("give either sparsity or mask, not both")
        bm, bk = check_block_size(block_size)
        weight = linear.weight.detach()
        check_divisible(weight.shape, (bm, bk), "Linear weight")
        Backend.parse(backend)  # validate before building anything
        if sparsity is not None:
            if not 0.0 <= float(sparsity) <= 1.0:
                raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
            mask = topk_block_mask(weight, (bm, bk), float(sparsity))
        if mask is not None and tuple(mask.shape) == tuple(weight.shape):
            mask = mask.to(weight.device)
        bst = BlockSparseTensor.from_dense(weight, (bm, bk), mask=mask)
        return cls.from_block_sparse(bst, linear.bias, backend=backend)

    @classmethod
    def from_block_sparse(cls, weight: BlockSparseTensor, bias: torch.Tensor | None = None,
                          backend: "Backend | str" = "auto") -> "SparseLinear":
        n, k = weight.shape
        module = cls(k, n, weight.block_size, bias=bias is not None, block_mask=weight.block_mask(),
                     backend=backend, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.values.copy_(weight.values)
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def to_linear(self) -> nn.Linear:
        """The equivalent dense nn.Linear (pruned blocks as zeros)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # -- views ----------------------------------------------------------------------------
    @property
    def weight(self) -> BlockSparseTensor:
        return BlockSparseTensor(self.values, *(getattr(self, n) for n in INDEX_NAMES),
                                 shape=(self.out_features, self.in_features), check_index=False)

    @property
    def density(self) -> float:
        return block_density(self.values.shape[0], (self.out_features, self.in_features),
                             self.block_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, density={self.density:.3f}, "
                f"bias={self.bias is not None}, backend={self.backend.value}")

    # -- routing --------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The backend asked for ("auto" unless forced); setting it routes the layer again."""
        return self._backend

    @backend.setter
    def backend(self, value: "Backend | str") -> None:
        self._backend = Backend.parse(value)
        self.reroute()

    def reroute(self) -> Route:
        """Ask the router again for this layer's device, dtype and layout (it does so itself
        when the layer is built, moved or loaded)."""
        self._route = route("bsr_linear", self.values.device, self.values.dtype, self.backend,
                            block_size=self.block_size, density=self.density)
        # eager calls that need no gradient skip the op dispatcher (see forward)
        r = self._route
        self._direct = (direct_linear() if r.backend is Backend.CPU
                        and (not r.dense or r.sparse_below_rows) else None)
        return self._route

    @property
    def route(self) -> Route:
        """What runs this layer: the router's decision (see sparsekernels.ops.router)."""
        return self._route

    # -- compute --------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """The fast path of the input checks (a layer checks its own bias once, when built);
        on a mismatch the full check raises the error that names the fix."""
        if (x.shape[-1] != self.in_features or x.dtype != self.values.dtype
                or x.device != self.values.device):
            from sparsekernels.formats.functional import check_linear_inputs

            check_linear_inputs(x, self.weight, self.bias)

    def packed(self) -> torch.Tensor | None:
        """The C++ kernel's W.T blocks as a view of `values` (no copy), or None when the
        blocks are not stored that way or the kernel computes in another dtype."""
        view = self.values.transpose(1, 2)
        if view.is_contiguous() and self.values.dtype in (torch.float32, torch.float64):
            return view
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        direct = self._direct
        if (direct is not None and type(x) is torch.Tensor and not torch.compiler.is_compiling()
                and (not self._route.dense
                     or x.numel() < self._route.sparse_below_rows * self.in_features)):
            params = self._parameters
            values, bias = params["values"], params.get("bias")
            if (not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or (
                    bias is not None and bias.requires_grad)))
                    and not _MODE_STACKS()):  # eager inference: the kernel, without dispatch
                y = direct(x, values, self._buffers["crow_indices"],
                           self._buffers["col_indices"], bias, self.in_features)
                if y is not None:
                    return y
        self.check_input(x)
        r = self._route
        if r.dense:
            return torch.nn.functional.linear(x, self.weight.to_dense(), self.bias)
        if r.backend is Backend.CPU and not _needs_grad(x, self):
            packed = self.packed()
            if packed is not None:
                return linear_packed(x, self.values, packed, self.crow_indices,
                                     self.col_indices, self.bias)
        return torch.ops.sparsekernels.bsr_linear(x, *self.op_args(), self.bias, r.backend.value)

    def add_norm_forward(self, x: torch.Tensor, residual: torch.Tensor,
                         norm: nn.LayerNorm) -> torch.Tensor | None:
        """norm(self(x) + residual) in one kernel call, the norm the kernel's epilogue on rows
        still in cache, where the kernel has one (bf16 on AVX-512 BF16, eager CPU inference);
        None otherwise (the caller runs the layer, then the norm). The result is the unfused
        one's, bit for bit."""
        if (self._direct is None or self._route.dense or type(x) is not torch.Tensor
                or type(residual) is not torch.Tensor
                or torch.compiler.is_compiling() or _MODE_STACKS()):
            return None
        params = self._parameters
        values, bias = params["values"], params.get("bias")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
                x, values, bias, residual, norm.weight, norm.bias)):
            return None
        entry = _ext.direct("linear_add_norm_inference")
        if entry is None:
            return None
        return entry(x, values, self._buffers["crow_indices"], self._buffers["col_indices"], bias,
                     self.in_features, residual, norm.weight, norm.bias, float(norm.eps))

    def op_args(self) -> tuple:
        """The stored blocks and index, in the order the sparsekernels ops take them."""
        return inner_tensors(self)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        laid_out = lay_out(self.values.data)
        if laid_out is not self.values.data:
            self.values.data = laid_out
        self.reroute()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint may hold a different block layout (another pruning run): check it once
        # here (the kernels trust the index) and adopt its shapes before copying. Parts the
        # state dict lacks (a partial load) are checked as the module holds them.
        incoming = {n: state_dict[prefix + n] for n in INNER_NAMES if prefix + n in state_dict}
        if incoming:
            first = next(iter(incoming.values()))
            device = first.device if isinstance(first, torch.Tensor) else self.values.device
            parts = {n: incoming[n] if n in incoming else getattr(self, n).detach()
                     for n in INNER_NAMES}
            parts = {n: t.to(device) if isinstance(t, torch.Tensor) else t
                     for n, t in parts.items()}  # for the check only: same device, same dtype
            name = prefix[:-1] if prefix.endswith(".") else (prefix or "SparseLinear")
            values = parts.pop("values")
            if isinstance(values, torch.Tensor) and tuple(values.shape[1:]) != self.block_size:
                error_msgs.append(f"{name}.values has block size {tuple(values.shape[1:])}, the "
                                  f"module has {self.block_size}")
                return
            try:
                validate_index(values, parts, (self.out_features, self.in_features), name)
            except InvalidIndexError as e:
                error_msgs.append(str(e))
                return
            if values.shape[0] != self.values.shape[0]:
                self.values = nn.Parameter(
                    self._empty_values(values.shape[0], self.values.device, self.values.dtype),
                    requires_grad=self.values.requires_grad)
                for n in INDEX_NAMES:
                    setattr(self, n, getattr(self, n).new_empty(parts[n].shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.reroute()  # a loaded layout can change the density


def sparsify_(model: nn.Module, block_size=(32, 32), sparsity: float | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              backend: "Backend | str" = "auto", dtype=None) -> nn.Module:
    """Replace nn.Linear modules of `model` by SparseLinear, in place; returns the model.

    filter_fn(module, fqn) chooses the layers (default: every nn.Linear whose shape the block
    size divides; others are left dense with a warning). A layer chosen by filter_fn that the
    block size does not divide is an error, raised before any layer is replaced.
    dtype: None / torch.float32 (as is), torch.bfloat16 (the model is cast to bf16 and the
    sparse layers run the bf16 kernels) or "int8" / torch.int8 (the new layers become
    QuantizedSparseLinear: int8 weights, activations in the model's dtype); see
    sparsekernels.nn.quantized_sparse_linear.apply_dtype_.
    """
    from sparsekernels.ops.precision import parse_dtype

    bm, bk = check_block_size(block_size)
    Backend.parse(backend)
    parse_dtype(dtype)  # validate before mutating
    if sparsity is not None and not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    chosen, skipped = [], []
    for fqn, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        divisible = module.out_features % bm == 0 and module.in_features % bk == 0
        if filter_fn is not None:
            if not filter_fn(module, fqn):
                continue
            if not divisible:
                check_divisible(module.weight.shape, (bm, bk), f"layer {fqn!r}")
        elif not divisible:
            skipped.append(fqn)
            continue
        chosen.append(fqn)
    if skipped:
        warnings.warn(f"sparsify_: left dense (shape not divisible by block size {(bm, bk)}): "
                      + ", ".join(skipped))
    # all checks passed: now mutate
    for fqn in chosen:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, SparseLinear.from_linear(linear, (bm, bk), sparsity=sparsity,
                                                        backend=backend))
    if dtype is not None:
        from sparsekernels.nn.quantized_sparse_linear import apply_dtype_

        apply_dtype_(model, dtype, names=set(chosen))
    return model
