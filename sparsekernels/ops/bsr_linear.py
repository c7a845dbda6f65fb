"""sparsekernels::bsr_linear and its backward ops, with backend dispatch.

Three custom ops (torch.library), each with a fake implementation:
  bsr_linear(x, W)  = x @ W.T + bias    dense x sparse.T -> dense (forward)
  bsr_dsd(g, W)     = g @ W             dense x sparse -> dense (input gradient; uses the
                                        transposed index so it walks block columns)
  bsr_sdd(g, x)     = (g.T @ x)[stored] sampled dense-dense -> blocks (weight gradient)
bsr_linear has an autograd formula made of the other two.

bsr_linear_packed is bsr_linear's CPU inference route with the W.T blocks given by the caller
(a SparseLinear on the CPU stores its blocks so that values.transpose(1, 2) is that operand)
instead of packed on every call. It has no autograd formula; callers use it only when no
gradient is needed (linear_packed also skips the dispatcher where it may).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.eager import plain_inference
from sparsekernels.ops.router import route
from sparsekernels.ops.reference import bsr_linear as ref

OP = "bsr_linear"


def _as_rows(x: Tensor) -> Tensor:
    """[..., K] -> [T, K] with unit stride along K (kernels index rows by a stride)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _triton():
    from sparsekernels.ops.triton import bsr_linear as triton_bsr_linear

    return triton_bsr_linear


# --- forward -------------------------------------------------------------------------
@torch.library.custom_op("sparsekernels::bsr_linear", mutates_args=())
def _bsr_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                row_indices: Tensor, ccol_indices: Tensor, row_indices_t: Tensor,
                transpose_perm: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    n = (crow_indices.numel() - 1) * values.shape[1]
    x2 = _as_rows(x)
    chosen = route(OP, x.device, x.dtype, backend).backend
    if chosen is Backend.CPU:
        y = _ext.op(OP, "cpu")(x2, values, crow_indices, col_indices, bias)
    elif chosen is Backend.CUDA:
        y = _ext.op(OP, "cuda")(x2, values, crow_indices, col_indices, bias)
    elif chosen is Backend.TRITON:
        y = _triton().forward(x2, values, crow_indices, col_indices, bias)
    else:
        y = ref.forward(x2, values, row_indices, col_indices, n, bias)
    return y.reshape(*x.shape[:-1], n)


@_bsr_linear.register_fake
def _(x, values, crow_indices, col_indices, row_indices, ccol_indices, row_indices_t,
      transpose_perm, bias, backend):
    n = (crow_indices.shape[0] - 1) * values.shape[1]
    return x.new_empty((*x.shape[:-1], n))


def pack(values: Tensor) -> Tensor:
    """The CPU kernel's B operand: W.T blocks [nnz, bk, bm] in its compute type (half and
    bfloat16 run in float), made by the kernels' own rule."""
    return _ext.op("bsr_pack", "cpu")(values.detach())


def _linear_packed(x: Tensor, values: Tensor, packed: Tensor, crow_indices: Tensor,
                   col_indices: Tensor, bias: Optional[Tensor]) -> Tensor:
    n = (crow_indices.numel() - 1) * values.shape[1]
    y = _ext.op(OP, "cpu")(_as_rows(x), values, crow_indices, col_indices, bias, packed)
    return y.reshape(*x.shape[:-1], n)


_bsr_linear_packed = torch.library.custom_op("sparsekernels::bsr_linear_packed", _linear_packed,
                                             mutates_args=())


def direct_linear():
    """The extension's direct CPU entry for an eager SparseLinear call that needs no gradient:
    `f(x, values, crow_indices, col_indices, bias, in_features)` with the blocks laid out as
    a SparseLinear stores them on the CPU; it returns None for an x it does not take. None
    when the extension lacks it. The caller checks plain_inference first."""
    return _ext.direct("linear_inference")


def linear_packed(x: Tensor, values: Tensor, packed: Tensor, crow_indices: Tensor,
                  col_indices: Tensor, bias: Optional[Tensor]) -> Tensor:
    """bsr_linear_packed, run directly when the call may skip the dispatcher (eager, no
    gradient: sparsekernels.ops.eager), else through the op."""
    if plain_inference(x, values, bias):
        return _linear_packed(x, values, packed, crow_indices, col_indices, bias)
    return torch.ops.sparsekernels.bsr_linear_packed(x, values, packed, crow_indices,
                                                     col_indices, bias)


@_bsr_linear_packed.register_fake
def _(x, values, packed, crow_indices, col_indices, bias):
    return x.new_empty((*x.shape[:-1], (crow_indices.shape[0] - 1) * values.shape[1]))


# --- input gradient: g @ W -------------------------------------------------------------
@torch.library.custom_op("sparsekernels::bsr_dsd", mutates_args=())
def _bsr_dsd(grad: Tensor, values: Tensor, ccol_indices: Tensor, row_indices_t: Tensor,
             transpose_perm: Tensor, backend: str) -> Tensor:
    g2 = _as_rows(grad)
    chosen = route(OP, grad.device, grad.dtype, backend).backend
    if chosen is Backend.CPU:
        out = _ext.op("bsr_dsd", "cpu")(g2, values, ccol_indices, row_indices_t, transpose_perm)
    elif chosen is Backend.CUDA:
        out = _ext.op("bsr_dsd", "cuda")(g2, values, ccol_indices, row_indices_t, transpose_perm)
    elif chosen is Backend.TRITON:
        out = _triton().bsr_dsd(g2, values, ccol_indices, row_indices_t, transpose_perm)
    else:
        nbc = ccol_indices.numel() - 1
        cols_t = torch.repeat_interleave(
            torch.arange(nbc, device=grad.device), (ccol_indices[1:] - ccol_indices[:-1]).long())
        vals_t = values[transpose_perm.long()]
        out = ref.bsr_dsd(g2, vals_t, row_indices_t, cols_t, nbc * values.shape[2])
    return out.reshape(*grad.shape[:-1], out.shape[-1])


@_bsr_dsd.register_fake
def _(grad, values, ccol_indices, row_indices_t, transpose_perm, backend):
    k = (ccol_indices.shape[0] - 1) * values.shape[2]
    return grad.new_empty((*grad.shape[:-1], k))


# --- weight gradient: blocks of g.T @ x ------------------------------------------------
@torch.library.custom_op("sparsekernels::bsr_sdd", mutates_args=())
def _bsr_sdd(grad: Tensor, x: Tensor, row_indices: Tensor, col_indices: Tensor,
             block_m: int, block_k: int, backend: str) -> Tensor:
    g2, x2 = _as_rows(grad), _as_rows(x)
    chosen = route(OP, grad.device, grad.dtype, backend).backend
    if chosen is Backend.CPU:
        return _ext.op("bsr_sdd", "cpu")(g2, x2, row_indices, col_indices, block_m, block_k)
    if chosen is Backend.CUDA:
        return _ext.op("bsr_sdd", "cuda")(g2, x2, row_indices, col_indices, block_m, block_k)
    if chosen is Backend.TRITON:
        return _triton().bsr_sdd(g2, x2, row_indices, col_indices, block_m, block_k)
    return ref.bsr_sdd(g2, x2, row_indices, col_indices, (block_m, block_k))


@_bsr_sdd.register_fake
def _(grad, x, row_indices, col_indices, block_m, block_k, backend):
    return grad.new_empty((row_indices.shape[0], block_m, block_k))


# --- autograd --------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, values, _, _, row_indices, ccol_indices, row_indices_t, transpose_perm, bias, backend = inputs
    ctx.save_for_backward(x, values, row_indices, ccol_indices, row_indices_t, transpose_perm)
    ctx.col_indices = inputs[3]
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _backward(ctx, grad):
    x, values, row_indices, ccol_indices, row_indices_t, transpose_perm = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.sparsekernels.bsr_dsd(grad, values, ccol_indices, row_indices_t,
                                                 transpose_perm, ctx.backend)
    if ctx.needs_input_grad[1]:
        grad_values = torch.ops.sparsekernels.bsr_sdd(
            grad, x, row_indices, ctx.col_indices, values.shape[1], values.shape[2], ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[8]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_values, None, None, None, None, None, None, grad_bias, None


_bsr_linear.register_autograd(_backward, setup_context=_setup_context)
