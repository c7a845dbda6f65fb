"""sparsekernels::bsr_gated_ffn: a gated block-sparse FFN (Llama / Mistral / Qwen / Phi
SwiGLU with "silu", Gemma GeGLU with "gelu_tanh"):

    y = down(act(gate(x) + b_g) * (up(x) + b_u)) + b_d

with three block-sparse weights, gate and up [N1, K] (one block size), down [N2, N1];
biases optional. How much is fused depends on the backend:
  cpu        one C++ kernel at every token count; the [T, N1] intermediate never reaches
             memory (csrc/cpu/ffn.h: per-thread row chunks in L2, or at decode the threads
             split the hidden units, then the outputs, each weight read once);
  triton     gate and up in one kernel with act(gate) * up in its epilogue, then down: the
             intermediate is written once and read once;
  cuda       bsr_linear x 3 around the activation-multiply;
  reference  the same composition in dense math (ops/reference/bsr_ffn.py, the oracle).
Training recomputes the intermediate in the backward (as bsr_ffn), and the gradients run
the bsr_linear backward ops (bsr_dsd, bsr_sdd).

bsr_gated_ffn_packed is the CPU inference route with the three layers' W.T blocks given by
the caller (a SparseLinear's stored layout, or bsr_linear.pack), as bsr_ffn_packed. The
functional form over BlockSparseTensor weights is sparsekernels.formats.functional.
sparse_gated_ffn.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.eager import plain_inference
from sparsekernels.ops.bsr_ffn import activate, activation_backward
from sparsekernels.ops.reference import bsr_ffn as ref_ffn
from sparsekernels.ops.router import route

OP = "bsr_gated_ffn"


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --- forward -------------------------------------------------------------------------
@torch.library.custom_op("sparsekernels::bsr_gated_ffn", mutates_args=())
def _bsr_gated_ffn(x: Tensor,
                   values_g: Tensor, crow_g: Tensor, col_g: Tensor, row_g: Tensor,
                   ccol_g: Tensor, row_t_g: Tensor, perm_g: Tensor, bias_g: Optional[Tensor],
                   values_u: Tensor, crow_u: Tensor, col_u: Tensor, row_u: Tensor,
                   ccol_u: Tensor, row_t_u: Tensor, perm_u: Tensor, bias_u: Optional[Tensor],
                   values_d: Tensor, crow_d: Tensor, col_d: Tensor, row_d: Tensor,
                   ccol_d: Tensor, row_t_d: Tensor, perm_d: Tensor, bias_d: Optional[Tensor],
                   activation: str, backend: str) -> Tensor:
    n1 = (crow_g.numel() - 1) * values_g.shape[1]
    n2 = (crow_d.numel() - 1) * values_d.shape[1]
    x2 = _rows(x)
    r = route(OP, x.device, x.dtype, backend)
    chosen = r.backend
    if chosen is Backend.CPU:
        y = _ext.op(OP, "cpu")(x2, values_g, crow_g, col_g, bias_g, values_u, crow_u, col_u,
                               bias_u, values_d, crow_d, col_d, bias_d, activation)
    elif chosen is Backend.TRITON:
        from sparsekernels.ops.triton import bsr_linear as tri

        if (bias_g is None) != (bias_u is None):  # the gated kernel takes both or neither
            bias_g = bias_g if bias_g is not None else values_g.new_zeros(n1)
            bias_u = bias_u if bias_u is not None else values_u.new_zeros(n1)
        h = tri.bsr_gated_linear(x2, values_g, crow_g, col_g, bias_g, values_u, crow_u, col_u,
                                 bias_u, activation)
        y = tri.forward(h, values_d, crow_d, col_d, bias_d)
    elif chosen is Backend.REFERENCE:
        y = ref_ffn.bsr_gated_ffn(x2, values_g, row_g, col_g, bias_g, values_u, row_u, col_u,
                                  bias_u, values_d, row_d, col_d, bias_d, n1, n2, activation)
    else:  # cuda: bsr_linear x 3
        linear = torch.ops.sparsekernels.bsr_linear
        g = linear(x2, values_g, crow_g, col_g, row_g, ccol_g, row_t_g, perm_g, bias_g,
                   chosen.value)
        u = linear(x2, values_u, crow_u, col_u, row_u, ccol_u, row_t_u, perm_u, bias_u,
                   chosen.value)
        y = linear(activate(g, activation) * u, values_d, crow_d, col_d, row_d, ccol_d,
                   row_t_d, perm_d, bias_d, chosen.value)
    return y.reshape(*x.shape[:-1], n2)


@_bsr_gated_ffn.register_fake
def _(x, values_g, crow_g, col_g, row_g, ccol_g, row_t_g, perm_g, bias_g,
      values_u, crow_u, col_u, row_u, ccol_u, row_t_u, perm_u, bias_u,
      values_d, crow_d, col_d, row_d, ccol_d, row_t_d, perm_d, bias_d, activation, backend):
    return x.new_empty((*x.shape[:-1], (crow_d.shape[0] - 1) * values_d.shape[1]))


def direct_gated_ffn():
    """The extension's direct CPU entry for an eager fused gated MLP call that needs no
    gradient: `f(x, values_g, crow_g, col_g, bias_g, values_u, ..., bias_d, activation,
    in_features)` on the blocks as SparseLinear stores them; None for an x it does not take.
    None when the extension lacks it. The caller checks for a gradient and modes first."""
    return _ext.direct("gated_ffn_inference")


def _gated_ffn_packed(x: Tensor,
                          values_g: Tensor, packed_g: Tensor, crow_g: Tensor, col_g: Tensor,
                          bias_g: Optional[Tensor],
                          values_u: Tensor, packed_u: Tensor, crow_u: Tensor, col_u: Tensor,
                          bias_u: Optional[Tensor],
                          values_d: Tensor, packed_d: Tensor, crow_d: Tensor, col_d: Tensor,
                          bias_d: Optional[Tensor], activation: str) -> Tensor:
    """bsr_gated_ffn's CPU inference route with the three layers' W.T blocks made by the
    caller (no autograd formula: callers use it only when no gradient is needed)."""
    n2 = (crow_d.numel() - 1) * values_d.shape[1]
    x2 = _rows(x)
    y = _ext.op(OP, "cpu")(x2, values_g, crow_g, col_g, bias_g, values_u, crow_u, col_u, bias_u,
                           values_d, crow_d, col_d, bias_d, activation, packed_g, packed_u,
                           packed_d)
    return y.reshape(*x.shape[:-1], n2)


_bsr_gated_ffn_packed = torch.library.custom_op("sparsekernels::bsr_gated_ffn_packed",
                                                _gated_ffn_packed, mutates_args=())


def gated_ffn_packed(x: Tensor, *args) -> Tensor:
    """bsr_gated_ffn_packed(x, *args) (the op's arguments), run directly when the call may
    skip the dispatcher (eager, no gradient: sparsekernels.ops.eager), else through the op."""
    if plain_inference(x, *args[:-1]):  # the last argument is the activation's name
        return _gated_ffn_packed(x, *args)
    return torch.ops.sparsekernels.bsr_gated_ffn_packed(x, *args)


@_bsr_gated_ffn_packed.register_fake
def _(x, values_g, packed_g, crow_g, col_g, bias_g, values_u, packed_u, crow_u, col_u, bias_u,
      values_d, packed_d, crow_d, col_d, bias_d, activation):
    return x.new_empty((*x.shape[:-1], (crow_d.shape[0] - 1) * values_d.shape[1]))


# --- autograd: recompute gate and up, then the bsr_linear backward ops -----------------
# input positions in the op's schema
_X, _VG, _BG, _VU, _BU, _VD, _BD = 0, 1, 8, 9, 16, 17, 24


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_BD + 1])
    ctx.has_bias = (inputs[_BG] is not None, inputs[_BU] is not None, inputs[_BD] is not None)
    ctx.activation, ctx.backend = inputs[25], inputs[26]


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    x = saved[_X]
    gate, up, down = saved[_VG:_BG], saved[_VU:_BU], saved[_VD:_BD]  # values + 6 index arrays
    bias_g, bias_u = saved[_BG], saved[_BU]
    ops, backend, need = torch.ops.sparsekernels, ctx.backend, ctx.needs_input_grad
    g2, x2 = _rows(grad), _rows(x)

    def sdd(g, a, w):  # blocks of g.T @ a at w's stored positions
        return ops.bsr_sdd(g, a, w[3], w[2], w[0].shape[1], w[0].shape[2], backend)

    def dsd(g, w):  # g @ W
        return ops.bsr_dsd(g, w[0], w[4], w[5], w[6], backend)

    pre_g = ops.bsr_linear(x2, *gate, bias_g, backend)
    u = ops.bsr_linear(x2, *up, bias_u, backend)
    a = activate(pre_g, ctx.activation)
    grads = [None] * 27
    if need[_VD]:
        grads[_VD] = sdd(g2, a * u, down)
    if ctx.has_bias[2] and need[_BD]:
        grads[_BD] = g2.sum(0)
    if any(need[i] for i in (_X, _VG, _BG, _VU, _BU)):
        grad_h = dsd(g2, down)
        grad_u = grad_h * a
        grad_g = activation_backward(grad_h * u, pre_g, ctx.activation)
        if need[_X]:
            grads[_X] = (dsd(grad_g, gate) + dsd(grad_u, up)).reshape(x.shape)
        if need[_VG]:
            grads[_VG] = sdd(grad_g, x2, gate)
        if need[_VU]:
            grads[_VU] = sdd(grad_u, x2, up)
        if ctx.has_bias[0] and need[_BG]:
            grads[_BG] = grad_g.sum(0)
        if ctx.has_bias[1] and need[_BU]:
            grads[_BU] = grad_u.sum(0)
    return tuple(grads)


_bsr_gated_ffn.register_autograd(_backward, setup_context=_setup_context)
