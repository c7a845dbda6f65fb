"""sparsekernels::add_layer_norm: layer_norm(x + residual) in one op (inference only).

A post-norm block (BERT's attention and FFN outputs) ends in a residual add and a LayerNorm;
torch runs them as two ops that read and write the activations five times. On the CPU, for
float32 and bfloat16, this is one pass per row (csrc/cpu/add_layer_norm.cpp): the sum is kept
in fp32 (torch's bf16 add rounds it to bf16 first, so in bf16 the result is closer to the
float64 reference than torch's), statistics in fp32. Elsewhere, or for other dtypes, it is
torch's F.layer_norm(x + residual). The op has no autograd formula: add_layer_norm runs
torch's two ops when a gradient is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsekernels.ops import _ext
from sparsekernels.ops.eager import plain_inference

OP = "add_layer_norm"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kernel_runs(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor]) -> bool:
    """The compiled kernel takes these operands (shapes checked by the caller): CPU tensors,
    x and residual of one kernel dtype, weight and bias float32 or bfloat16."""
    return (x.is_cpu and residual.is_cpu and x.dtype in _KERNEL_DTYPES
            and residual.dtype == x.dtype
            and (weight is None or (weight.is_cpu and weight.dtype in _KERNEL_DTYPES))
            and (bias is None or (bias.is_cpu and bias.dtype in _KERNEL_DTYPES)))


def _add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float) -> Tensor:
    if x.shape == residual.shape and _kernel_runs(x, residual, weight, bias) and _ext.has_op(
            OP, "cpu"):
        return _ext.op(OP, "cpu")(x, residual, weight, bias, eps)
    return F.layer_norm(x + residual, x.shape[-1:], weight, bias, eps)


_op = torch.library.custom_op("sparsekernels::add_layer_norm", _add_layer_norm, mutates_args=())


@_op.register_fake
def _(x, residual, weight, bias, eps):
    torch._check(x.shape == residual.shape, lambda: "x and residual must have one shape")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """F.layer_norm(x + residual, x.shape[-1:], weight, bias, eps), fused where it can be.

    x, residual: one shape and dtype; weight, bias: None or [x.shape[-1]]. Without a
    gradient to compute it runs the op (directly in eager inference, see ops.eager); with one,
    torch's add and layer_norm."""
    shape = x.shape
    if residual.shape != shape or residual.dtype != x.dtype:
        raise ValueError("add_layer_norm: x and residual must have one shape and dtype, got "
                         f"{tuple(shape)} {x.dtype} and {tuple(residual.shape)} {residual.dtype}")
    width = shape[-1:]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != width:
            raise ValueError(f"add_layer_norm: {name} must have shape {tuple(width)} (the "
                             f"rows' width), got {tuple(p.shape)}")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"add_layer_norm: eps must be a finite number >= 0, got {eps}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, residual, weight, bias)):
        return F.layer_norm(x + residual, width, weight, bias, eps)
    if _kernel_runs(x, residual, weight, bias) and plain_inference(x, residual, weight, bias):
        direct = _ext.direct(OP)  # the kernel without the dispatcher's per-call cost
        if direct is not None:
            return direct(x, residual, weight, bias, float(eps))
    return torch.ops.sparsekernels.add_layer_norm(x, residual, weight, bias, float(eps))
