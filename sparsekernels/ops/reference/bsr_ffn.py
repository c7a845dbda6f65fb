"""Reference block-sparse FFNs: bsr_linear's reference, the activation, bsr_linear again.
Pure torch, float64-capable (the oracle of bsr_ffn and bsr_gated_ffn)."""

from __future__ import annotations

import torch.nn.functional as F

from sparsekernels.ops.reference.bsr_linear import forward as bsr_linear


def activate(h, activation: str):
    """The FFN activations by name: none, gelu (erf), gelu_tanh, relu, silu."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    return h


def bsr_ffn(x, values1, row1, col1, bias1, values2, row2, col2, bias2, hidden: int,
            out_features: int, activation: str):
    """act(x @ W1.T + b1) @ W2.T + b2; W1 [hidden, K], W2 [out_features, hidden]."""
    h = activate(bsr_linear(x, values1, row1, col1, hidden, bias1), activation)
    return bsr_linear(h, values2, row2, col2, out_features, bias2)


def bsr_gated_ffn(x, values_g, row_g, col_g, bias_g, values_u, row_u, col_u, bias_u,
                  values_d, row_d, col_d, bias_d, hidden: int, out_features: int,
                  activation: str):
    """(act(x @ Wg.T + bg) * (x @ Wu.T + bu)) @ Wd.T + bd; Wg, Wu [hidden, K],
    Wd [out_features, hidden]."""
    gate = activate(bsr_linear(x, values_g, row_g, col_g, hidden, bias_g), activation)
    up = bsr_linear(x, values_u, row_u, col_u, hidden, bias_u)
    return bsr_linear(gate * up, values_d, row_d, col_d, out_features, bias_d)
