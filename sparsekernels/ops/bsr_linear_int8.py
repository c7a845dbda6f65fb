"""sparsekernels::bsr_linear_int8: a block-sparse Linear with int8 weights (inference only).

    y = x @ (scale[:, None] * q).T + bias      q int8 blocks, scale one float32 per output

Two kernels (csrc/cpu/bsr_linear_int8.cpp), chosen per call by precision.int8_scheme:
  w8    weight-only: x stays fp32 / bf16, the int8 weights are converted in registers (decode);
  w8a8  x quantized per token at run time (unsigned codes with a zero point), int8 x int8
        with int32 sums (prefill).
The CPU kernels read the blocks packed once ([nnz, bk/4, bm, 4] plus the per-column weight
sums that the zero points need, `comp`); callers cache `pack(...)`, or the op packs per call.
Quantization rules and the worst-case error bound: ops/reference/bsr_linear_int8.py and
tests/ops/test_bsr_linear_int8.py. Off the CPU (or without the extension) the reference runs the same math in torch.
The output has x's dtype; there is no autograd formula (quantized layers do not train).
The w8a8 quantization depends on x alone: eager QuantizedSparseLinear calls on one tensor (an
attention's q, k and v) share it (shared_quantized_rows).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.router import route
from sparsekernels.ops.precision import int8_scheme
from sparsekernels.ops.reference import bsr_linear_int8 as ref

OP = "bsr_linear_int8"


def _as_rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def pack(values: Tensor, crow_indices: Tensor) -> tuple[Tensor, Tensor]:
    """(packed int8 blocks, int32 compensation per output) for the CPU kernels."""
    return _ext.op("bsr_pack_int8", "cpu")(values, crow_indices)


def direct_int8_linear():
    """The extension's direct CPU entry for an eager QuantizedSparseLinear call that needs no
    gradient: `f(x, packed, comp, scale, crow, col, bias, scheme, in_features, w8_max_rows)`;
    it returns None for an x it does not take. None when the extension lacks it. The caller
    checks plain_inference first (sparsekernels.ops.eager)."""
    return _ext.direct("int8_linear_inference")


def direct_int8_linear_quantized():
    """The direct CPU entry for a QuantizedSparseLinear call on rows shared_quantized_rows
    gave: `f(x, q, xs, xz, packed, comp, scale, crow, col, bias, in_features, out_dtype)`
    (scheme w8a8; bit for bit direct_int8_linear's result); None when the extension lacks it."""
    return _ext.direct("int8_linear_quantized_inference")


# The last input the w8a8 kernels quantized, with its codes: (weak reference to the tensor, its
# version counter, data pointer and shape, in_features, (codes, scales, zero points)).
_last_quantized: list = [None]


def shared_quantized_rows(x: Tensor, in_features: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """x's rows quantized as the w8a8 kernels quantize them (per row, so every int8 layer
    gets the same codes from one x), computed once for consecutive layers that read this very
    tensor: an attention's q, k and v projections quantize their input once, not three times.

    The codes are reused only for the same tensor object at the same version counter (an
    in-place write bumps it), data pointer and shape; inference tensors keep no version
    counter, so for them this returns None (the caller quantizes per call). One entry is
    kept, until another tensor is quantized. None where the extension lacks the entry or does
    not take x (the caller's path then decides)."""
    if x.is_inference():
        return None
    last = _last_quantized[0]
    version, ptr, shape = x._version, x.data_ptr(), x.shape
    if (last is not None and last[0]() is x and last[1] == version and last[2] == ptr
            and last[3] == shape and last[4] == in_features):
        return last[5]
    entry = _ext.direct("int8_quantize_rows")
    if entry is None:
        return None
    rows = entry(x, in_features)
    if not rows:
        return None
    rows = tuple(rows)
    _last_quantized[0] = (weakref.ref(x), version, ptr, shape, in_features, rows)
    return rows


def choose_backend(backend: str, device: torch.device) -> Backend:
    """The router's choice for int8 weights (a CPU kernel, else the reference)."""
    return route(OP, device, torch.float32, backend).backend


@torch.library.custom_op("sparsekernels::bsr_linear_int8", mutates_args=())
def _bsr_linear_int8(x: Tensor, values: Tensor, scale: Tensor, crow_indices: Tensor,
                     col_indices: Tensor, row_indices: Tensor, bias: Optional[Tensor],
                     packed: Optional[Tensor], comp: Optional[Tensor], scheme: str,
                     backend: str) -> Tensor:
    n = (crow_indices.numel() - 1) * values.shape[1]
    x2 = _as_rows(x)
    chosen_scheme = int8_scheme(x2.shape[0], scheme)
    if choose_backend(backend, x.device) is Backend.CPU:
        if packed is None or comp is None:
            packed, comp = pack(values, crow_indices)
        y = _ext.op(OP, "cpu")(x2, packed, comp, scale, crow_indices, col_indices, bias,
                               chosen_scheme)
    else:
        y = ref.bsr_linear_int8(x2, values, scale, row_indices, col_indices, n, bias,
                                chosen_scheme).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


@_bsr_linear_int8.register_fake
def _(x, values, scale, crow_indices, col_indices, row_indices, bias, packed, comp, scheme,
      backend):
    return x.new_empty((*x.shape[:-1], (crow_indices.shape[0] - 1) * values.shape[1]))


def check_int8_inputs(x: Tensor, in_features: int, values: Tensor, device) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"wrong input width: the layer expects [..., {in_features}] inputs, got "
                         f"{list(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"int8 layers take float32 or bfloat16 inputs, got {x.dtype}: cast the "
                        "input (x.float())")
    if x.device != device:
        raise ValueError(f"device mismatch: input on {x.device}, weights on {device}; move the "
                         "module or the input with .to(device)")
    if values.dtype != torch.int8:
        raise TypeError(f"int8 values expected, got {values.dtype}: quantize with "
                        "sparsekernels.ops.reference.bsr_linear_int8.quantize_blocks")


def bsr_linear_int8(x: Tensor, values: Tensor, scale: Tensor, crow_indices: Tensor,
                    col_indices: Tensor, row_indices: Tensor, in_features: int,
                    bias: Optional[Tensor] = None, scheme: str = "auto",
                    backend: "Backend | str" = "auto", packed: Optional[Tensor] = None,
                    comp: Optional[Tensor] = None) -> Tensor:
    """x[..., K] @ (scale * values).T + bias for int8 blocks `values` [nnz, bm, bk] in the
    BSR index (crow, col, row); scheme auto / w8 / w8a8; backend auto, cpu or reference."""
    check_int8_inputs(x, in_features, values, values.device)
    int8_scheme(1, scheme)  # validate
    return torch.ops.sparsekernels.bsr_linear_int8(
        x, values, scale, crow_indices, col_indices, row_indices, bias, packed, comp, scheme,
        Backend.parse(backend).value)
