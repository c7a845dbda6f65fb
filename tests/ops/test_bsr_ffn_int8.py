"""sparsekernels::bsr_ffn_int8: the fused int8 FFN computes per row exactly what
bsr_linear_int8 -> activation (fp32) -> bsr_linear_int8 computes, and stays close to the
unquantized FFN in float64."""

import pytest
import torch
from torch.library import opcheck

from sparsekernels import BlockSparseTensor
from sparsekernels.ops import _ext
from sparsekernels.ops.bsr_ffn import activate
from sparsekernels.ops.bsr_ffn_int8 import bsr_ffn_int8
from sparsekernels.ops.bsr_linear_int8 import pack
from sparsekernels.ops.reference import bsr_linear_int8 as ref
from sparsekernels.testing import random_block_mask
from tests.ops.isa_paths import PATHS, use_isa

K, HIDDEN, N = 128, 256, 128


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    return use_isa(request.param, monkeypatch, "bsr_ffn_int8", "avx512_vnni")


def layer(n, k, density, block=(32, 32), empty=False):
    grid = (n // block[0], k // block[1])
    mask = random_block_mask(grid, density)
    if empty:
        mask[0] = False
    w = BlockSparseTensor.from_dense(torch.randn(n, k, dtype=torch.float64) / k ** 0.5, block, mask)
    q, scale = ref.quantize_blocks(w.values, w.row_indices, grid[0])
    bias = torch.randn(n)
    return w, (q, scale, w.crow_indices, w.col_indices, w.row_indices, bias, None, None)


def layers(density, block2=(32, 32)):
    return layer(HIDDEN, K, density, empty=density == 0.5), layer(N, HIDDEN, density, block2)


def composed(x, l1, l2, activation, scheme):
    linear = torch.ops.sparsekernels.bsr_linear_int8
    h = linear(x, *l1, scheme, "cpu")
    return linear(activate(h, activation), *l2, scheme, "cpu")


@pytest.mark.parametrize("tokens", [17, 24, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "none"])
def test_fused_is_the_composition_row_for_row(isa, tokens, density, activation):
    (_, l1), (w2, l2) = layers(density)
    x = torch.randn(tokens, K)
    y = bsr_ffn_int8(x, l1, l2, activation, scheme="w8a8", backend="cpu")
    want = composed(x, l1, l2, activation, "w8a8")
    if isa == "generic" or activation != "gelu":
        assert torch.equal(y, want)
        return
    # On AVX-512 the kernel's GELU (activation.h) is within an ulp or two of F.gelu, not equal:
    # a row's intermediate scale may move by an ulp, and rarely a code by one step, which moves
    # that row by the scale times a column of W2
    h = activate(torch.ops.sparsekernels.bsr_linear_int8(x, *l1, "w8a8", "cpu"), activation)
    _, h_scale = ref.quantize_rows(h)
    step = h_scale.double()[:, None] * w2.to_dense().abs().max().item()
    diff = (y.double() - want.double()).abs()
    assert (diff <= 2 * step + 1e-5 * want.abs().max().item()).all()
    assert diff.median() <= 1e-6 * want.abs().max().item()  # most outputs agree to rounding


@pytest.mark.parametrize("scheme", ["auto", "w8", "w8a8"])
@pytest.mark.parametrize("tokens", [(3,), (2, 50)], ids=["T3", "B2xT50"])
def test_close_to_the_unquantized_ffn(isa, scheme, tokens):
    (w1, l1), (w2, l2) = layers(0.5, block2=(64, 32))
    x = torch.randn(*tokens, K)
    y = bsr_ffn_int8(x, l1, l2, "gelu", scheme=scheme, backend="cpu")
    assert y.shape == (*tokens, N) and y.dtype == torch.float32
    h = torch.nn.functional.gelu(x.double() @ w1.to_dense().T + l1[5].double())
    y64 = h @ w2.to_dense().T + l2[5].double()
    # typical error of two quantized layers (documented beside bsr_linear_int8's bound)
    rel = ((y.double() - y64).norm() / (y64 - l2[5].double()).norm()).item()
    assert rel < 0.03, rel


def test_bf16_activations(isa):
    (w1, l1), (w2, l2) = layers(0.5)
    x = torch.randn(64, K, dtype=torch.bfloat16)
    y = bsr_ffn_int8(x, l1, l2, "gelu", scheme="w8a8", backend="cpu")
    assert y.dtype == torch.bfloat16
    y32 = bsr_ffn_int8(x.float(), l1, l2, "gelu", scheme="w8a8", backend="cpu")
    # the same codes (bf16 widens exactly); only the output rounding differs
    torch.testing.assert_close(y.float(), y32, rtol=2 ** -7, atol=2 ** -7 * y32.abs().max().item())


def test_packed_layers_and_reference_backend(isa):
    (_, l1), (_, l2) = layers(0.3)
    x = torch.randn(40, K)
    p1 = (*l1[:6], *pack(l1[0], l1[2]))
    p2 = (*l2[:6], *pack(l2[0], l2[2]))
    fused = bsr_ffn_int8(x, l1, l2, "relu", backend="cpu")
    assert torch.equal(fused, bsr_ffn_int8(x, p1, p2, "relu", backend="cpu"))
    reference = bsr_ffn_int8(x, l1, l2, "relu", backend="reference")
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


def test_opcheck():
    if not _ext.has_op("bsr_ffn_int8", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")
    (_, l1), (_, l2) = layers(0.5)
    for tokens in (4, 30):
        opcheck(torch.ops.sparsekernels.bsr_ffn_int8,
                (torch.randn(tokens, K), *l1, *l2, "gelu", "auto", "cpu"))


def test_bad_input_is_refused():
    (_, l1), (_, l2) = layers(0.5)
    with pytest.raises(ValueError, match="activation"):
        bsr_ffn_int8(torch.randn(4, K), l1, l2, "swish")
    with pytest.raises(ValueError, match="unknown int8 scheme"):
        bsr_ffn_int8(torch.randn(4, K), l1, l2, "gelu", scheme="w4")
