"""sparsekernels::bsr_ffn: a block-sparse feed-forward block, act(x @ W1.T + b1) @ W2.T + b2.

How much is fused depends on the backend:
  cpu        one C++ kernel at every token count: each thread keeps its rows' intermediate
             in an L2-sized buffer (bias and activation applied there), or at decode the
             threads split the hidden units, then the outputs, so the [T, N1]
             intermediate never reaches memory (csrc/cpu/ffn.h);
  triton     FFN1 with bias + activation in its epilogue, then FFN2: the intermediate is
             written once and read once, with no separate activation pass;
  cuda       bsr_linear, activation, bsr_linear;
  reference  the same composition in dense math (the oracle, float64-capable).
Training recomputes the intermediate in the backward instead of saving it (as activation
checkpointing does), so a fused FFN also holds no [T, N1] tensor between forward and
backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.eager import plain_inference
from sparsekernels.ops.reference import bsr_ffn as ref_ffn
from sparsekernels.ops.reference.bsr_ffn import activate
from sparsekernels.ops.router import route

__all__ = ["ACTIVATIONS", "activate", "activation_backward", "check_activation"]

OP = "bsr_ffn"
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "silu")


def activation_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """d activate(h) / dh applied to grad."""
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_backward(grad, h, approximate=approximate)
    if activation == "relu":
        return grad * (h > 0).to(grad.dtype)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    return grad


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --- forward -------------------------------------------------------------------------
@torch.library.custom_op("sparsekernels::bsr_ffn", mutates_args=())
def _bsr_ffn(x: Tensor,
             values1: Tensor, crow1: Tensor, col1: Tensor, row1: Tensor, ccol1: Tensor,
             row_t1: Tensor, perm1: Tensor, bias1: Optional[Tensor],
             values2: Tensor, crow2: Tensor, col2: Tensor, row2: Tensor, ccol2: Tensor,
             row_t2: Tensor, perm2: Tensor, bias2: Optional[Tensor],
             activation: str, backend: str) -> Tensor:
    n1 = (crow1.numel() - 1) * values1.shape[1]
    n2 = (crow2.numel() - 1) * values2.shape[1]
    x2 = _rows(x)
    r = route(OP, x.device, x.dtype, backend)
    chosen = r.backend
    if chosen is Backend.CPU:
        y = _ext.op(OP, "cpu")(x2, values1, crow1, col1, bias1, values2, crow2, col2, bias2, n1,
                               activation)
    elif chosen is Backend.TRITON:
        from sparsekernels.ops.triton import bsr_linear as tri

        h = tri.forward(x2, values1, crow1, col1, bias1, activation=activation)
        y = tri.forward(h, values2, crow2, col2, bias2)
    elif chosen is Backend.REFERENCE:
        y = ref_ffn.bsr_ffn(x2, values1, row1, col1, bias1, values2, row2, col2, bias2, n1, n2,
                            activation)
    else:  # cuda: bsr_linear, act, bsr_linear
        h = torch.ops.sparsekernels.bsr_linear(x2, values1, crow1, col1, row1, ccol1, row_t1,
                                               perm1, bias1, chosen.value)
        y = torch.ops.sparsekernels.bsr_linear(activate(h, activation), values2, crow2, col2,
                                               row2, ccol2, row_t2, perm2, bias2, chosen.value)
    return y.reshape(*x.shape[:-1], n2)


@_bsr_ffn.register_fake
def _(x, values1, crow1, col1, row1, ccol1, row_t1, perm1, bias1,
      values2, crow2, col2, row2, ccol2, row_t2, perm2, bias2, activation, backend):
    n2 = (crow2.shape[0] - 1) * values2.shape[1]
    return x.new_empty((*x.shape[:-1], n2))


def direct_ffn():
    """The extension's direct CPU entry for an eager fused SparseFFN call that needs no
    gradient: `f(x, values1, crow1, col1, bias1, values2, crow2, col2, bias2, activation,
    in_features)` on the blocks as SparseLinear stores them; None for an x it does not take.
    None when the extension lacks it. The caller checks for a gradient and modes first."""
    return _ext.direct("ffn_inference")


def _ffn_packed(x: Tensor, values1: Tensor, packed1: Tensor, crow1: Tensor, col1: Tensor,
                    bias1: Optional[Tensor], values2: Tensor, packed2: Tensor, crow2: Tensor,
                    col2: Tensor, bias2: Optional[Tensor], activation: str) -> Tensor:
    """bsr_ffn's CPU inference route with both layers' W.T blocks made by the caller (no
    autograd formula: callers use it only when no gradient is needed)."""
    n1 = (crow1.numel() - 1) * values1.shape[1]
    n2 = (crow2.numel() - 1) * values2.shape[1]
    x2 = _rows(x)
    y = _ext.op(OP, "cpu")(x2, values1, crow1, col1, bias1, values2, crow2, col2, bias2, n1,
                           activation, packed1, packed2)
    return y.reshape(*x.shape[:-1], n2)


_bsr_ffn_packed = torch.library.custom_op("sparsekernels::bsr_ffn_packed", _ffn_packed,
                                          mutates_args=())


def ffn_packed(x: Tensor, *args) -> Tensor:
    """bsr_ffn_packed(x, *args) (the op's arguments), run directly when the call may
    skip the dispatcher (eager, no gradient: sparsekernels.ops.eager), else through the op."""
    if plain_inference(x, *args[:-1]):  # the last argument is the activation's name
        return _ffn_packed(x, *args)
    return torch.ops.sparsekernels.bsr_ffn_packed(x, *args)


@_bsr_ffn_packed.register_fake
def _(x, values1, packed1, crow1, col1, bias1, values2, packed2, crow2, col2, bias2, activation):
    return x.new_empty((*x.shape[:-1], (crow2.shape[0] - 1) * values2.shape[1]))


# --- autograd: recompute the intermediate, then the bsr_linear backward ops twice ------
def _setup_context(ctx, inputs, output):
    (x, values1, crow1, col1, row1, ccol1, row_t1, perm1, bias1,
     values2, crow2, col2, row2, ccol2, row_t2, perm2, bias2, activation, backend) = inputs
    ctx.save_for_backward(x, values1, crow1, col1, row1, ccol1, row_t1, perm1, bias1,
                          values2, col2, row2, ccol2, row_t2, perm2)
    ctx.has_bias = (bias1 is not None, bias2 is not None)
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, grad):
    (x, values1, crow1, col1, row1, ccol1, row_t1, perm1, bias1,
     values2, col2, row2, ccol2, row_t2, perm2) = ctx.saved_tensors
    ops, backend = torch.ops.sparsekernels, ctx.backend
    need = ctx.needs_input_grad
    g = _rows(grad)
    x2 = _rows(x)
    h = ops.bsr_linear(x2, values1, crow1, col1, row1, ccol1, row_t1, perm1, bias1, backend)
    a = activate(h, ctx.activation)
    grad_v2 = ops.bsr_sdd(g, a, row2, col2, values2.shape[1], values2.shape[2],
                          backend) if need[9] else None
    grad_b2 = g.sum(0) if ctx.has_bias[1] and need[16] else None
    grad_x = grad_v1 = grad_b1 = None
    if need[0] or need[1] or need[8]:
        grad_h = activation_backward(ops.bsr_dsd(g, values2, ccol2, row_t2, perm2, backend), h,
                                      ctx.activation)
        if need[0]:
            grad_x = ops.bsr_dsd(grad_h, values1, ccol1, row_t1, perm1,
                                 backend).reshape(x.shape)
        if need[1]:
            grad_v1 = ops.bsr_sdd(grad_h, x2, row1, col1, values1.shape[1], values1.shape[2],
                                  backend)
        if ctx.has_bias[0] and need[8]:
            grad_b1 = grad_h.sum(0)
    return (grad_x, grad_v1, None, None, None, None, None, None, grad_b1,
            grad_v2, None, None, None, None, None, None, grad_b2, None, None)


_bsr_ffn.register_autograd(_backward, setup_context=_setup_context)


# --- argument checks -----------------------------------------------------------------
def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of "
                         f"{', '.join(ACTIVATIONS)}")
