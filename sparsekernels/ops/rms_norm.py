"""sparsekernels::rms_norm: RMSNorm as one op (inference only).

x / sqrt(mean(x^2) + eps) * w, with w the weight or, with `offset`, 1 + weight (Gemma); fp32
statistics. `round_normed` rounds x / rms to x's dtype before the weight multiplies it and
the product again, as Llama-style norms do (weight * h.to(input_dtype)); without it the
product is computed in fp32 and rounded once (Gemma, torch.nn.RMSNorm). On the CPU, for
float32 and bfloat16, one pass per row (csrc/cpu/rms_norm.cpp); elsewhere torch's ops. A
decoder LLM runs two or more per layer at every decode step, where transformers' five or six
ATen ops each cost more than the arithmetic. No autograd: rms_norm runs torch's ops when a
gradient is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsekernels.ops import _ext
from sparsekernels.ops.eager import plain_inference

OP = "rms_norm"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def torch_rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, offset: bool,
                   round_normed: bool) -> Tensor:
    """The same arithmetic in torch ops (any device, dtype, and autograd)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return h.to(x.dtype)
    w = weight.float() + 1 if offset else weight.float()
    if round_normed:
        return (w.to(x.dtype) * h.to(x.dtype)).to(x.dtype)
    return (h * w).to(x.dtype)


def _kernel_runs(x: Tensor, weight: Optional[Tensor]) -> bool:
    return (x.is_cpu and x.dtype in _KERNEL_DTYPES
            and (weight is None or (weight.is_cpu and weight.dtype in _KERNEL_DTYPES)))


def _rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, offset: bool,
              round_normed: bool) -> Tensor:
    if x.dim() >= 1 and _kernel_runs(x, weight) and _ext.has_op(OP, "cpu"):
        return _ext.op(OP, "cpu")(x, weight, eps, offset, round_normed)
    return torch_rms_norm(x, weight, eps, offset, round_normed)


_op = torch.library.custom_op("sparsekernels::rms_norm", _rms_norm, mutates_args=())


@_op.register_fake
def _(x, weight, eps, offset, round_normed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def check(x: Tensor, weight: Optional[Tensor], eps: float) -> None:
    if x.dim() < 1:
        raise ValueError("rms_norm: x needs a last dimension to normalise over")
    if weight is not None and tuple(weight.shape) != tuple(x.shape[-1:]):
        raise ValueError(f"rms_norm: weight must have shape {tuple(x.shape[-1:])} (the rows' "
                         f"width), got {tuple(weight.shape)}")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {eps}")


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
             offset: bool = False, round_normed: bool = True) -> Tensor:
    """RMSNorm of x over its last dim (see the module docstring), fused where it can be:
    the op without a gradient to compute (directly in eager inference), torch's ops with
    one."""
    check(x, weight, eps)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None
                                                        and weight.requires_grad)):
        return torch_rms_norm(x, weight, eps, offset, round_normed)
    if _kernel_runs(x, weight) and plain_inference(x, weight):
        direct = _ext.direct(OP)  # the kernel without the dispatcher's per-call cost
        if direct is not None:
            return direct(x, weight, float(eps), offset, round_normed)
    return torch.ops.sparsekernels.rms_norm(x, weight, float(eps), offset, round_normed)
