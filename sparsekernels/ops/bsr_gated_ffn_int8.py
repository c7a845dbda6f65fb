"""sparsekernels::bsr_gated_ffn_int8: a gated block-sparse FFN with int8 weights (Llama /
Mistral / Qwen MLPs; inference only), (act(x @ Wg.T + bg) * (x @ Wu.T + bu)) @ Wd.T + bd, each
W = scale * q as in bsr_linear_int8.

With the w8a8 scheme on the CPU this is one fused kernel (csrc/cpu/bsr_ffn_int8.cpp, beside
the plain int8 FFN): each thread quantizes its rows of x once for gate and up, multiplies
act(gate) by up in its own buffer, re-quantizes that per row and multiplies by Wd; per row it
computes exactly bsr_linear_int8(w8a8) of gate and up -> act(gate) * up in fp32 ->
bsr_linear_int8(w8a8) of down. With w8 (few rows) or off the CPU it runs the three layers with
bsr_linear_int8.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.eager import eager_or_op
from sparsekernels.ops.bsr_ffn import activate, check_activation
from sparsekernels.ops.bsr_ffn_int8 import LAYER_ARGS, packed_or_pack
from sparsekernels.ops.bsr_linear_int8 import choose_backend
from sparsekernels.ops.precision import int8_scheme

OP = "bsr_gated_ffn_int8"


def _gated_ffn_int8(x: Tensor,
                        values_g: Tensor, scale_g: Tensor, crow_g: Tensor, col_g: Tensor,
                        row_g: Tensor, bias_g: Optional[Tensor], packed_g: Optional[Tensor],
                        comp_g: Optional[Tensor],
                        values_u: Tensor, scale_u: Tensor, crow_u: Tensor, col_u: Tensor,
                        row_u: Tensor, bias_u: Optional[Tensor], packed_u: Optional[Tensor],
                        comp_u: Optional[Tensor],
                        values_d: Tensor, scale_d: Tensor, crow_d: Tensor, col_d: Tensor,
                        row_d: Tensor, bias_d: Optional[Tensor], packed_d: Optional[Tensor],
                        comp_d: Optional[Tensor],
                        activation: str, scheme: str, backend: str) -> Tensor:
    n = (crow_d.numel() - 1) * values_d.shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    chosen = choose_backend(backend, x.device)
    if (chosen is Backend.CPU and int8_scheme(x2.shape[0], scheme) == "w8a8"
            and _ext.has_op(OP, "cpu")):
        packed_g, comp_g = packed_or_pack(values_g, crow_g, packed_g, comp_g)
        packed_u, comp_u = packed_or_pack(values_u, crow_u, packed_u, comp_u)
        packed_d, comp_d = packed_or_pack(values_d, crow_d, packed_d, comp_d)
        y = _ext.op(OP, "cpu")(x2.contiguous(),
                                     packed_g, comp_g, scale_g, crow_g, col_g, bias_g,
                                     packed_u, comp_u, scale_u, crow_u, col_u, bias_u,
                                     packed_d, comp_d, scale_d, crow_d, col_d, bias_d, activation)
        return y.reshape(*x.shape[:-1], n)
    linear = torch.ops.sparsekernels.bsr_linear_int8
    g = linear(x2, values_g, scale_g, crow_g, col_g, row_g, bias_g, packed_g, comp_g, scheme,
               backend)
    u = linear(x2, values_u, scale_u, crow_u, col_u, row_u, bias_u, packed_u, comp_u, scheme,
               backend)
    y = linear(activate(g, activation) * u, values_d, scale_d, crow_d, col_d, row_d, bias_d,
               packed_d, comp_d, scheme, backend)
    return y.reshape(*x.shape[:-1], n)


_bsr_gated_ffn_int8 = torch.library.custom_op("sparsekernels::bsr_gated_ffn_int8",
                                              _gated_ffn_int8, mutates_args=())


def gated_ffn_int8_eager(x: Tensor, *args) -> Tensor:
    """sparsekernels::bsr_gated_ffn_int8(x, *args) (the op's arguments): its implementation
    directly when the call may skip the dispatcher (sparsekernels.ops.eager), else the op."""
    return eager_or_op(_gated_ffn_int8, torch.ops.sparsekernels.bsr_gated_ffn_int8, x, *args)


@_bsr_gated_ffn_int8.register_fake
def _(x, *args):
    values_d, crow_d = args[16], args[18]
    return x.new_empty((*x.shape[:-1], (crow_d.shape[0] - 1) * values_d.shape[1]))


def bsr_gated_ffn_int8(x: Tensor, gate: tuple, up: tuple, down: tuple,
                       activation: str = "silu", scheme: str = "auto",
                       backend: "Backend | str" = "auto") -> Tensor:
    """down(act(gate(x)) * up(x)) for three int8 layers, each given as
    (values, scale, crow, col, row, bias, packed, comp) (packed / comp may be None). Gate and
    up must have the same shape and block size."""
    check_activation(activation)
    int8_scheme(1, scheme)
    if len(gate) != 8 or len(up) != 8 or len(down) != 8:
        raise ValueError(f"each layer is {LAYER_ARGS}")
    (vg, _, cg, *_), (vu, _, cu, *_) = gate, up
    if vg.shape[1:] != vu.shape[1:] or cg.shape != cu.shape:
        raise ValueError(f"gate and up must have the same shape and block size: gate has "
                         f"{cg.numel() - 1} block rows of {tuple(vg.shape[1:])}, up "
                         f"{cu.numel() - 1} of {tuple(vu.shape[1:])}")
    return torch.ops.sparsekernels.bsr_gated_ffn_int8(x, *gate, *up, *down, activation, scheme,
                                                      Backend.parse(backend).value)
