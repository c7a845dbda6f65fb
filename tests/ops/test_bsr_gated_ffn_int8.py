"""sparsekernels::bsr_gated_ffn_int8: the fused gated int8 FFN computes per row exactly what
bsr_linear_int8 of gate and up -> act(gate) * up (fp32) -> bsr_linear_int8 of down computes,
and stays close to the unquantized gated FFN in float64."""

import pytest
import torch
from torch.library import opcheck

from sparsekernels import BlockSparseTensor
from sparsekernels.ops import _ext
from sparsekernels.ops.bsr_ffn import activate
from sparsekernels.ops.bsr_gated_ffn_int8 import bsr_gated_ffn_int8
from sparsekernels.ops.bsr_linear_int8 import pack
from sparsekernels.ops.reference import bsr_linear_int8 as ref
from sparsekernels.testing import random_block_mask
from tests.ops.test_bsr_ffn_int8 import isa  # noqa: F401  (native and generic ISA)

K, HIDDEN, N = 128, 256, 96


def layer(n, k, density, block=(32, 32), empty=False, bias=True):
    grid = (n // block[0], k // block[1])
    mask = random_block_mask(grid, density)
    if empty:
        mask[0] = False  # a block row with no stored block: the bias alone
    w = BlockSparseTensor.from_dense(torch.randn(n, k, dtype=torch.float64) / k ** 0.5, block, mask)
    q, scale = ref.quantize_blocks(w.values, w.row_indices, grid[0])
    b = torch.randn(n) if bias else None
    return w, (q, scale, w.crow_indices, w.col_indices, w.row_indices, b, None, None)


def layers(density, down_block=(32, 32), bias=True):
    return (layer(HIDDEN, K, density, empty=density == 0.5, bias=bias),
            layer(HIDDEN, K, density, bias=bias),
            layer(N, HIDDEN, density, down_block, bias=bias))


def composed(x, g, u, d, activation, scheme):
    linear = torch.ops.sparsekernels.bsr_linear_int8
    h = activate(linear(x, *g, scheme, "cpu"), activation) * linear(x, *u, scheme, "cpu")
    return linear(h, *d, scheme, "cpu")


@pytest.mark.parametrize("tokens", [17, 24, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])
def test_fused_is_the_composition_row_for_row(isa, tokens, density, activation):
    (_, g), (_, u), (_, d) = layers(density)
    x = torch.randn(tokens, K)
    y = bsr_gated_ffn_int8(x, g, u, d, activation, scheme="w8a8", backend="cpu")
    assert torch.equal(y, composed(x, g, u, d, activation, "w8a8"))


@pytest.mark.parametrize("scheme", ["auto", "w8", "w8a8"])
@pytest.mark.parametrize("tokens", [(3,), (2, 50)], ids=["T3", "B2xT50"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_close_to_the_unquantized_gated_ffn(isa, scheme, tokens, bias):
    (wg, g), (wu, u), (wd, d) = layers(0.5, down_block=(32, 64), bias=bias)
    x = torch.randn(*tokens, K)
    y = bsr_gated_ffn_int8(x, g, u, d, "silu", scheme=scheme, backend="cpu")
    assert y.shape == (*tokens, N) and y.dtype == torch.float32

    def lin(x64, w, layer_args):
        b = layer_args[5]
        return x64 @ w.to_dense().T + (0 if b is None else b.double())

    x64 = x.double()
    h = torch.nn.functional.silu(lin(x64, wg, g)) * lin(x64, wu, u)
    y64 = lin(h, wd, d)
    bd = 0 if d[5] is None else d[5].double()
    # typical error of two chained quantized layers (the plain int8 FFN's bound)
    rel = ((y.double() - y64).norm() / (y64 - bd).norm()).item()
    assert rel < 0.03, rel


def test_bf16_activations(isa):
    (_, g), (_, u), (_, d) = layers(0.5)
    x = torch.randn(64, K, dtype=torch.bfloat16)
    y = bsr_gated_ffn_int8(x, g, u, d, "silu", scheme="w8a8", backend="cpu")
    assert y.dtype == torch.bfloat16
    y32 = bsr_gated_ffn_int8(x.float(), g, u, d, "silu", scheme="w8a8", backend="cpu")
    # the same codes (bf16 widens exactly); only the output rounding differs
    torch.testing.assert_close(y.float(), y32, rtol=2 ** -7, atol=2 ** -7 * y32.abs().max().item())


def test_packed_layers_and_reference_backend(isa):
    (_, g), (_, u), (_, d) = layers(0.3)
    x = torch.randn(40, K)
    packed = [(*t[:6], *pack(t[0], t[2])) for t in (g, u, d)]
    fused = bsr_gated_ffn_int8(x, g, u, d, "silu", backend="cpu")
    assert torch.equal(fused, bsr_gated_ffn_int8(x, *packed, "silu", backend="cpu"))
    reference = bsr_gated_ffn_int8(x, g, u, d, "silu", backend="reference")
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


def test_opcheck():
    if not _ext.has_op("bsr_gated_ffn_int8", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")
    (_, g), (_, u), (_, d) = layers(0.5)
    for tokens in (4, 30):
        opcheck(torch.ops.sparsekernels.bsr_gated_ffn_int8,
                (torch.randn(tokens, K), *g, *u, *d, "silu", "auto", "cpu"))


def test_bad_input_is_refused():
    (_, g), (_, u), (_, d) = layers(0.5)
    x = torch.randn(4, K)
    with pytest.raises(ValueError, match="activation"):
        bsr_gated_ffn_int8(x, g, u, d, "swish")
    with pytest.raises(ValueError, match="unknown int8 scheme"):
        bsr_gated_ffn_int8(x, g, u, d, "silu", scheme="w4")
    _, narrow = layer(HIDDEN // 2, K, 0.5)
    with pytest.raises(ValueError, match="same shape and block size"):
        bsr_gated_ffn_int8(x, g, narrow, d, "silu")
    if _ext.has_op("bsr_gated_ffn_int8", "cpu"):
        _, wide = layer(N, 2 * HIDDEN, 0.5)  # down reads more inputs than gate and up make
        with pytest.raises(RuntimeError, match="down"):
            bsr_gated_ffn_int8(torch.randn(40, K), g, u, wide, "silu", scheme="w8a8",
                               backend="cpu")
