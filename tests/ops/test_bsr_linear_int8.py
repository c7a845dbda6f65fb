"""sparsekernels::bsr_linear_int8 (w8 and w8a8) against float64.

Two questions, two oracles:
- is the kernel right? Against the exact quantized math in float64 (same int8 weights, same
  activation codes): within twice the error torch makes computing it in float32.
- how much does quantization cost? Against the unquantized layer in float64, within the
  worst-case bound of symmetric rounding (documented in docs and below):
      w8    |y - y64| <= scale[n] / 2 * |x_t|_1
      w8a8  |y - y64| <= scale[n] / 2 * |x_t|_1 + s_t / 2 * |w_n|_1 + s_t * scale[n] / 4 * K
  (s_t = (max(x_t, 0) - min(x_t, 0)) / 255 the row's activation step), plus float32 rounding.
"""

import pytest
import torch
from torch.library import opcheck

from sparsekernels import BlockSparseTensor
from sparsekernels.ops import _ext
from sparsekernels.ops.bsr_linear_int8 import bsr_linear_int8, pack
from sparsekernels.ops.precision import W8_MAX_ROWS, int8_scheme
from sparsekernels.ops.reference import bsr_linear_int8 as ref
from sparsekernels.testing import assert_close_to_reference, random_block_mask
from tests.ops.isa_paths import PATHS, use_isa

SCHEMES = ["w8", "w8a8"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def need_cpu():
    if not _ext.has_op("bsr_linear_int8", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    return use_isa(request.param, monkeypatch, None, "avx512_vnni")


def layer(n, k, block=(32, 32), density=0.5, empty=False):
    grid = (n // block[0], k // block[1])
    mask = random_block_mask(grid, density)
    if empty and grid[0] > 1:
        mask[0] = False  # an empty block row: its outputs are the bias
    w = BlockSparseTensor.from_dense(torch.randn(n, k, dtype=torch.float64) / k ** 0.5, block, mask)
    q, scale = ref.quantize_blocks(w.values, w.row_indices, grid[0])
    return w, q, scale, torch.randn(n)


def run(x, w, q, scale, bias, scheme, backend="cpu", packed=None):
    p, c = (None, None) if packed is None else packed
    return bsr_linear_int8(x, q, scale, w.crow_indices, w.col_indices, w.row_indices, w.shape[1],
                           bias, scheme, backend, p, c)


def torch_fp32(x, w, q, scale, bias, scheme):
    """The quantized math as torch computes it in float32 (the error baseline)."""
    wq = ref.bsr_to_dense(q.float(), w.row_indices, w.col_indices, w.shape)
    x2 = x.reshape(-1, x.shape[-1])
    if scheme == "w8a8":
        codes, xs = ref.quantize_rows(x2)
        y = (codes @ wq.T) * xs[:, None] * scale
    else:
        y = (x2.float() @ wq.T) * scale
    return (y + bias).reshape(*x.shape[:-1], -1).to(x.dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 5, 16, 97, 515], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0], ids=lambda d: f"d{d}")
def test_kernel_matches_quantized_reference(isa, scheme, dtype, tokens, density):
    need_cpu()
    dtype = DTYPES[dtype]
    w, q, scale, bias = layer(192, 256, density=density, empty=density == 0.5)
    x = torch.randn(tokens, 256).to(dtype)
    y = run(x, w, q, scale, bias, scheme)
    assert y.dtype == dtype and y.shape == (tokens, 192)
    exact = ref.bsr_linear_int8(x, q, scale, w.row_indices, w.col_indices, 192, bias, scheme)
    assert_close_to_reference(y, exact, torch_fp32(x, w, q, scale, bias, scheme), reduction=256)


@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 32), (128, 16), (16, 128)],
                         ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_block_sizes_and_3d_input(isa, block, scheme):
    need_cpu()
    w, q, scale, bias = layer(256, 384, block, density=0.4)
    x = torch.randn(2, 33, 384)
    y = run(x, w, q, scale, bias, scheme)
    assert y.shape == (2, 33, 256)
    exact = ref.bsr_linear_int8(x.reshape(-1, 384), q, scale, w.row_indices, w.col_indices, 256,
                                bias, scheme).reshape(2, 33, 256)
    assert_close_to_reference(y, exact, torch_fp32(x, w, q, scale, bias, scheme), reduction=384)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tokens", [3, 200], ids=lambda t: f"T{t}")
def test_quantization_error_within_the_documented_bound(scheme, tokens):
    need_cpu()
    w, q, scale, bias = layer(256, 512, density=0.5)
    x = torch.randn(tokens, 512)
    x[0] *= 50  # a row with an outlier scale: per-token scales keep the others fine
    y = run(x, w, q, scale, bias, scheme).double()
    y64 = x.double() @ w.to_dense().T + bias.double()
    w64 = w.to_dense().abs()
    bound = scale.double()[None, :] / 2 * x.double().abs().sum(1, keepdim=True)
    if scheme == "w8a8":
        s = (x.double().clamp_min(0).amax(1, keepdim=True)
             - x.double().clamp_max(0).amin(1, keepdim=True)) / 255
        bound = bound + s / 2 * w64.sum(1)[None, :] + s * scale.double()[None, :] / 4 * 512
    slack = 1e-5 * y64.abs().max()
    assert ((y - y64).abs() <= bound + slack).all()
    # and typically far inside it: relative RMS error of a Gaussian layer
    rel = ((y - y64).norm() / (y64 - bias.double()).norm()).item()
    assert rel < (0.01 if scheme == "w8" else 0.02), rel


def test_schemes_route_by_rows():
    assert int8_scheme(1) == "w8" and int8_scheme(W8_MAX_ROWS) == "w8"
    assert int8_scheme(W8_MAX_ROWS + 1) == "w8a8"
    assert int8_scheme(1, "w8a8") == "w8a8" and int8_scheme(1000, "w8") == "w8"
    with pytest.raises(ValueError, match="unknown int8 scheme"):
        int8_scheme(4, "int4")


@pytest.mark.parametrize("tokens", [4, 40], ids=lambda t: f"T{t}")
def test_auto_and_packed_and_reference_agree(tokens):
    need_cpu()
    w, q, scale, bias = layer(128, 192)
    x = torch.randn(tokens, 192)
    scheme = int8_scheme(tokens)
    auto = run(x, w, q, scale, bias, "auto")
    assert torch.equal(auto, run(x, w, q, scale, bias, scheme))
    assert torch.equal(auto, run(x, w, q, scale, bias, "auto", packed=pack(q, w.crow_indices)))
    reference = run(x, w, q, scale, bias, "auto", backend="reference")
    torch.testing.assert_close(auto, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_opcheck(scheme):
    need_cpu()
    w, q, scale, bias = layer(64, 96)
    x = torch.randn(20, 96)
    packed, comp = pack(q, w.crow_indices)
    for args in ((x, q, scale, w.crow_indices, w.col_indices, w.row_indices, bias, None, None,
                  scheme, "cpu"),
                 (x, q, scale, w.crow_indices, w.col_indices, w.row_indices, None, packed, comp,
                  scheme, "auto")):
        opcheck(torch.ops.sparsekernels.bsr_linear_int8, args)


def test_pack_layout_and_compensation():
    need_cpu()
    w, q, scale, _ = layer(64, 128, density=0.6)
    packed, comp = pack(q, w.crow_indices)
    nnz = q.shape[0]
    assert packed.shape == (nnz, 8, 32, 4) and packed.dtype == torch.int8
    assert torch.equal(packed, q.reshape(nnz, 32, 8, 4).permute(0, 2, 1, 3))
    dense = ref.bsr_to_dense(q.long(), w.row_indices, w.col_indices, (64, 128))
    assert torch.equal(comp.long(), dense.sum(1))


def test_bad_input_is_refused_with_the_fix():
    need_cpu()
    w, q, scale, bias = layer(64, 96)
    with pytest.raises(ValueError, match="wrong input width"):
        run(torch.randn(3, 64), w, q, scale, bias, "w8")
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        run(torch.randn(3, 96, dtype=torch.float64), w, q, scale, bias, "w8")
    with pytest.raises(TypeError, match="int8 values"):
        run(torch.randn(3, 96), w, q.float(), scale, bias, "w8")
    packed, comp = pack(q, w.crow_indices)
    kernel = torch.ops.sparsekernels_C.bsr_linear_int8_cpu
    bad_col = w.col_indices.clone()
    bad_col[0] = 99
    with pytest.raises(RuntimeError, match="outside"):
        kernel(torch.randn(3, 96), packed, comp, scale, w.crow_indices, bad_col, bias, "w8a8")
    with pytest.raises(RuntimeError, match="scale must be float32"):
        kernel(torch.randn(3, 96), packed, comp, scale.double(), w.crow_indices, w.col_indices,
               bias, "w8a8")
    with pytest.raises(RuntimeError, match="unknown int8 scheme"):
        kernel(torch.randn(3, 96), packed, comp, scale, w.crow_indices, w.col_indices, bias, "w4")
