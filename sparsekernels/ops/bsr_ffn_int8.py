"""sparsekernels::bsr_ffn_int8: a block-sparse FFN with int8 weights (inference only),
act(x @ W1.T + b1) @ W2.T + b2, each W = scale * q as in bsr_linear_int8.

With the w8a8 scheme on the CPU this is one fused kernel (csrc/cpu/bsr_ffn_int8.cpp): each
thread quantizes its rows, keeps their fp32 intermediate in its own buffer (bias and
activation applied there), re-quantizes it per row and multiplies by W2, so the [T, N1]
intermediate never reaches memory; per row it computes bsr_linear_int8(w8a8) -> activation
in fp32 -> bsr_linear_int8(w8a8), exactly, except that on AVX-512 its GELU is the kernel's
own (csrc/cpu/activation.h, within an ulp or two of F.gelu), which can move a code of the
re-quantized intermediate. With w8 (few rows) or off the CPU it runs the two layers with
bsr_linear_int8 around the activation.
The gated form is ops.bsr_gated_ffn_int8.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsekernels.ops import _ext
from sparsekernels.ops.bsr_ffn import activate, check_activation
from sparsekernels.ops.bsr_linear_int8 import choose_backend, pack
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.eager import eager_or_op
from sparsekernels.ops.precision import int8_scheme

OP = "bsr_ffn_int8"
LAYER_ARGS = "(values, scale, crow, col, row, bias, packed, comp)"


def packed_or_pack(values: Tensor, crow: Tensor, packed: Optional[Tensor],
                   comp: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(packed, comp) as given, or packed now."""
    return (packed, comp) if packed is not None and comp is not None else pack(values, crow)


def _ffn_int8(x: Tensor,
                  values1: Tensor, scale1: Tensor, crow1: Tensor, col1: Tensor, row1: Tensor,
                  bias1: Optional[Tensor], packed1: Optional[Tensor], comp1: Optional[Tensor],
                  values2: Tensor, scale2: Tensor, crow2: Tensor, col2: Tensor, row2: Tensor,
                  bias2: Optional[Tensor], packed2: Optional[Tensor], comp2: Optional[Tensor],
                  activation: str, scheme: str, backend: str) -> Tensor:
    n2 = (crow2.numel() - 1) * values2.shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    chosen = choose_backend(backend, x.device)
    if (chosen is Backend.CPU and int8_scheme(x2.shape[0], scheme) == "w8a8"
            and _ext.has_op(OP, "cpu")):
        packed1, comp1 = packed_or_pack(values1, crow1, packed1, comp1)
        packed2, comp2 = packed_or_pack(values2, crow2, packed2, comp2)
        y = _ext.op(OP, "cpu")(x2.contiguous(), packed1, comp1, scale1, crow1, col1, bias1,
                               packed2, comp2, scale2, crow2, col2, bias2, activation)
        return y.reshape(*x.shape[:-1], n2)
    linear = torch.ops.sparsekernels.bsr_linear_int8
    h = linear(x2, values1, scale1, crow1, col1, row1, bias1, packed1, comp1, scheme, backend)
    y = linear(activate(h, activation), values2, scale2, crow2, col2, row2, bias2, packed2, comp2,
               scheme, backend)
    return y.reshape(*x.shape[:-1], n2)


_bsr_ffn_int8 = torch.library.custom_op("sparsekernels::bsr_ffn_int8", _ffn_int8,
                                        mutates_args=())


def ffn_int8_eager(x: Tensor, *args) -> Tensor:
    """sparsekernels::bsr_ffn_int8(x, *args) (the op's arguments): its implementation
    directly when the call may skip the dispatcher (sparsekernels.ops.eager), else the op."""
    return eager_or_op(_ffn_int8, torch.ops.sparsekernels.bsr_ffn_int8, x, *args)


@_bsr_ffn_int8.register_fake
def _(x, values1, scale1, crow1, col1, row1, bias1, packed1, comp1, values2, scale2, crow2, col2,
      row2, bias2, packed2, comp2, activation, scheme, backend):
    return x.new_empty((*x.shape[:-1], (crow2.shape[0] - 1) * values2.shape[1]))


def bsr_ffn_int8(x: Tensor, layer1: tuple, layer2: tuple, activation: str = "gelu",
                 scheme: str = "auto", backend: "Backend | str" = "auto") -> Tensor:
    """act(x @ W1.T + b1) @ W2.T + b2 for two int8 layers, each given as
    (values, scale, crow, col, row, bias, packed, comp) (packed / comp may be None)."""
    check_activation(activation)
    int8_scheme(1, scheme)
    if len(layer1) != 8 or len(layer2) != 8:
        raise ValueError(f"each layer is {LAYER_ARGS}")
    return torch.ops.sparsekernels.bsr_ffn_int8(x, *layer1, *layer2, activation, scheme,
                                                Backend.parse(backend).value)
