"""SparseLinear: an nn.Linear whose weight is block-sparse, and sparsify_ to swap them in.

The stored blocks are a plain Parameter `values` [nnz, bm, bk] and the layout lives in
int32 buffers, so optimizers, state_dict, `.to()` and torch.compile all see ordinary
tensors; `.weight` gives the same storage as a BlockSparseTensor.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch
from torch import nn

from sparsekernels.formats.block_sparse import (
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
from sparsekernels.ops.backend import ENV_BACKEND, Backend, select
from sparsekernels.ops.bsr_linear import pack, prefers_dense
from sparsekernels.ops.crossover import ENV_CROSSOVER


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W [out_features, in_features] stored as (bm, bk) blocks.

    backend: "auto" picks the kernel for the input's device and runs plain dense F.linear
    when the density is above the measured crossover, so it is never slower than the
    Linear it replaced; "cpu", "cuda", "triton" or "reference" force one.

    Inference (no gradient needed) caches what the route needs from the weight: the dense
    weight on the dense route, the CPU kernel's W.T blocks on the CPU route. A cache is
    rebuilt when `values` changes in place (its version counter), is loaded or moved, and
    dropped by train() / eval(). Writes through `values.data` bypass the version counter:
    after one, call eval() (or clear_cache()) before the next forward.
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
        self.backend = Backend.parse(backend)
        index = build_index(block_mask.to(device=device, dtype=torch.bool))
        for name in INDEX_NAMES:
            self.register_buffer(name, index[name])
        nnz = int(index["col_indices"].numel())
        self.values = nn.Parameter(torch.empty(nnz, bm, bk, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self._dense_cache: tuple | None = None
        self._packed_cache: tuple | None = None
        self._route: dict = {}  # (device type, dtype) -> (dense, CPU kernel, what they depend on)

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

        sparsity: keep the round((1 - sparsity) * n_blocks) blocks of largest L2 norm.
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
        bm, bk = self.block_size
        return self.values.shape[0] / max(1, (self.out_features // bm) * (self.in_features // bk))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, density={self.density:.3f}, "
                f"bias={self.bias is not None}, backend={self.backend.value}")

    # -- compute --------------------------------------------------------------------------
    def _cache_key(self) -> tuple:
        # what a cache built from `values` depends on (see the class docstring)
        v = self.values
        return (v.data_ptr(), v._version, v.dtype, v.device)

    def clear_cache(self) -> None:
        """Drop the inference caches (after writing `values` through `.data`)."""
        self._dense_cache = self._packed_cache = None

    def _dense_weight(self) -> torch.Tensor:
        # Inference reuses the densified weight until the values change; training rebuilds
        # it so gradients reach `values`.
        if torch.is_grad_enabled() and self.values.requires_grad:
            return self.weight.to_dense()
        key = self._cache_key()
        if self._dense_cache is None or self._dense_cache[0] != key:
            self._dense_cache = (key, self.weight.to_dense().detach())
        return self._dense_cache[1]

    def packed(self, x: torch.Tensor) -> torch.Tensor | None:
        """The CPU kernel's W.T blocks, cached, when `x` takes the CPU kernel and no
        gradient is needed; None otherwise (the op then packs them per call)."""
        return self._packed(x) if self._routing(x)[1] else None

    def _packed(self, x: torch.Tensor) -> torch.Tensor | None:
        # packed() for a caller that has routed x to the CPU kernel already
        if x.numel() == x.shape[-1] or torch.compiler.is_compiling():
            return None  # one row runs dot products on the blocks as stored
        if torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad or (
                self.bias is not None and self.bias.requires_grad)):
            return None
        key = self._cache_key()
        if self._packed_cache is None or self._packed_cache[0] != key:
            self._packed_cache = (key, pack(self.values))
        return self._packed_cache[1]

    def _routing(self, x: torch.Tensor) -> tuple[bool, bool]:
        """(run plain dense F.linear, run the CPU kernel) for this input. Decided in eager
        calls, remembered per (device, dtype) until the layout or the backend / crossover
        environment changes (a layer is called often: deciding costs more than a small
        kernel), and reused by torch.compile, which cannot run the backend probing inside a
        graph."""
        key = (x.device.type, x.dtype)
        if torch.compiler.is_compiling():
            return self._route.get(key, (False, False))[:2]
        stamp = (self.values.shape[0], os.environ.get(ENV_BACKEND), os.environ.get(ENV_CROSSOVER))
        cached = self._route.get(key)
        if cached is None or cached[2] != stamp:
            dense = prefers_dense(self.weight, x.device, self.backend)
            cpu = (not dense and x.device.type == "cpu"
                   and select(self.backend.value, x.device, "bsr_linear") is Backend.CPU)
            cached = self._route[key] = (dense, cpu, stamp)
        return cached[:2]

    def runs_dense(self, x: torch.Tensor) -> bool:
        """auto's routing for this input: True when plain dense F.linear is the faster path
        (see _routing)."""
        return self._routing(x)[0]

    def check_input(self, x: torch.Tensor) -> None:
        """The fast path of ops.bsr_linear.check_inputs (a layer checks its own bias once,
        when built); on a mismatch the full check raises the error that names the fix."""
        if (x.shape[-1] != self.in_features or x.dtype != self.values.dtype
                or x.device != self.values.device):
            from sparsekernels.ops.bsr_linear import check_inputs

            check_inputs(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        dense, cpu_kernel = self._routing(x)
        if dense:
            weight = (self.weight.to_dense() if torch.compiler.is_compiling()
                      else self._dense_weight())
            return torch.nn.functional.linear(x, weight, self.bias)
        packed = self._packed(x) if cpu_kernel else None
        if packed is not None:
            return torch.ops.sparsekernels.bsr_linear_packed(
                x, self.values, packed, self.crow_indices, self.col_indices, self.bias)
        return torch.ops.sparsekernels.bsr_linear(x, *self.op_args(), self.bias,
                                                  self.backend.value)

    def op_args(self) -> tuple:
        """The stored blocks and index, in the order the sparsekernels ops take them."""
        return inner_tensors(self)

    def _apply(self, fn, recurse=True):
        self.clear_cache()
        self._route = {}
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self.clear_cache()  # a mode switch is where training may have written `values`
        return super().train(mode)

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
                self.values = nn.Parameter(self.values.new_empty(values.shape),
                                           requires_grad=self.values.requires_grad)
                for n in INDEX_NAMES:
                    setattr(self, n, getattr(self, n).new_empty(parts[n].shape))
        self.clear_cache()
        self._route = {}  # a loaded layout can change the density, so the dense routing
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

def sparsify_(model: nn.Module, block_size=(32, 32), sparsity: float | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              backend: "Backend | str" = "auto") -> nn.Module:
    """Replace nn.Linear modules of `model` by SparseLinear, in place; returns the model.

    filter_fn(module, fqn) chooses the layers (default: every nn.Linear whose shape the block
    size divides; others are left dense with a warning). A layer chosen by filter_fn that the
    block size does not divide is an error, raised before any layer is replaced.
    """
    bm, bk = check_block_size(block_size)
    Backend.parse(backend)
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
    return model
