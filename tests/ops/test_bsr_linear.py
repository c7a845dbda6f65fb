"""sparsekernels::bsr_linear (and its backward ops) on every CPU-runnable backend vs float64."""

import os

import pytest
import torch
import torch.nn.functional as F

from sparsekernels import BlockSparseTensor
from sparsekernels.ops import _ext
from sparsekernels.formats.functional import sparse_linear
from sparsekernels.testing import assert_close_to_reference, random_block_mask

BACKENDS = ["reference", "cpu"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
          "fp16": torch.float16}


def need(backend):
    if backend == "cpu" and not _ext.has_op("bsr_linear", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")


def make_weight(n, k, block_size, density, dtype=torch.float32, empty_row_col=False):
    grid = (n // block_size[0], k // block_size[1])
    mask = random_block_mask(grid, density)
    if empty_row_col and grid[0] > 1 and grid[1] > 1:
        mask[0, :] = False  # an empty block row: output = bias there
        mask[:, -1] = False  # an empty block column: no gradient flows to those inputs
    w = torch.randn(n, k, dtype=torch.float64)
    return BlockSparseTensor.from_dense(w, block_size, mask=mask), mask


def expected(x, w64, bias):
    return F.linear(x.double(), w64, None if bias is None else bias.double())


def test_extension_is_built_when_required():
    # make test sets SPARSEKERNELS_REQUIRE_EXT=1 so a broken build fails instead of skipping
    if os.environ.get("SPARSEKERNELS_REQUIRE_EXT", "0") == "0":
        pytest.skip("SPARSEKERNELS_REQUIRE_EXT not set")
    assert _ext.load() is None, _ext.load()
    for op in ("bsr_linear", "bsr_dsd", "bsr_sdd", "bsr_ffn", "block_sparse_attention",
               "block_sparse_attention_backward"):
        assert _ext.has_op(op, "cpu"), f"the extension has no CPU kernel for {op}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 97, 1025], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0], ids=lambda d: f"d{d}")
def test_forward_matches_reference(backend, dtype, tokens, density):
    need(backend)
    dtype = DTYPES[dtype]
    W64, _ = make_weight(128, 192, (32, 32), density, empty_row_col=density == 0.5)
    W = W64.to(dtype)
    x = torch.randn(tokens, 192, dtype=dtype)
    bias = torch.randn(128, dtype=dtype)
    y = sparse_linear(x, W, bias, backend=backend)
    ref = expected(x, W.to_dense().double(), bias)
    base = F.linear(x, W.to_dense(), bias)
    assert y.dtype == dtype
    assert_close_to_reference(y, ref, base, reduction=192)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [(16, 16), (32, 64), (64, 32), (128, 16), (16, 128)],
                         ids=lambda b: f"b{b[0]}x{b[1]}")
def test_block_sizes_and_3d_input(backend, block_size):
    need(backend)
    W, _ = make_weight(256, 384, block_size, 0.4)
    W = W.float()
    x = torch.randn(2, 33, 384)
    y = sparse_linear(x, W, None, backend=backend)
    assert y.shape == (2, 33, 256)
    assert_close_to_reference(y, expected(x, W.to_dense().double(), None), F.linear(x, W.to_dense()),
                              reduction=384)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    need(backend)
    W, _ = make_weight(64, 96, (32, 32), 0.5)
    W = W.float()
    x_wide = torch.randn(40, 192)
    for x in (x_wide[:, ::2], x_wide[::2, :96], torch.randn(96, 40).t()):
        assert not x.is_contiguous()
        y = sparse_linear(x, W, backend=backend)
        assert_close_to_reference(y, expected(x, W.to_dense().double(), None), F.linear(x, W.to_dense()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("block_size", [(32, 32), (16, 64)], ids=lambda b: f"b{b[0]}x{b[1]}")
def test_gradients_match_reference(backend, density, block_size):
    need(backend)
    W, mask = make_weight(128, 128, block_size, density, empty_row_col=density == 0.3)
    W = W.float()
    x = torch.randn(3, 41, 128, requires_grad=True)
    values = W.values.clone().requires_grad_(True)
    bias = torch.randn(128, requires_grad=True)
    Wv = BlockSparseTensor.from_parts(values, W.index(), W.shape)
    y = sparse_linear(x, Wv, bias, backend=backend)
    g = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), g)

    # float64 truth, through dense autograd on the same blocks
    x64 = x.detach().double().requires_grad_(True)
    v64 = values.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True)
    y64 = F.linear(x64, BlockSparseTensor.from_parts(v64, W.index(), W.shape).to_dense(), b64)
    rx, rv, rb = torch.autograd.grad(y64, (x64, v64, b64), g.double())
    # torch's own fp32 error for the same products
    yb = F.linear(x.detach().requires_grad_(True), W.to_dense())
    assert_close_to_reference(gx, rx, g @ W.to_dense(), name="grad x")
    dense_gw = g.reshape(-1, 128).T @ x.detach().reshape(-1, 128)
    from sparsekernels.ops.reference.bsr_linear import dense_to_blocks
    base_gv = dense_to_blocks(dense_gw, W.row_indices, W.col_indices, block_size)
    assert_close_to_reference(gv, rv, base_gv, name="grad values")
    assert_close_to_reference(gb, rb, g.reshape(-1, 128).sum(0), name="grad bias")
    del yb
    if density == 0.3:
        empty_cols = ~mask.any(0)  # inputs that no stored block reads get zero gradient
        cols = empty_cols.repeat_interleave(block_size[1])
        assert torch.all(gx[..., cols] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    need(backend)
    W, _ = make_weight(64, 96, (32, 32), 0.5)
    W = W.float()
    x = torch.randn(7, 96, requires_grad=True)
    values = W.values.clone().requires_grad_(True)
    bias = torch.randn(64, requires_grad=True)
    ops = torch.ops.sparsekernels
    torch.library.opcheck(ops.bsr_linear.default,
                          (x, values, W.crow_indices, W.col_indices, W.row_indices,
                           W.ccol_indices, W.row_indices_t, W.transpose_perm, bias, backend))
    g = torch.randn(7, 64)
    torch.library.opcheck(ops.bsr_dsd.default,
                          (g, values.detach(), W.ccol_indices, W.row_indices_t, W.transpose_perm,
                           backend))
    torch.library.opcheck(ops.bsr_sdd.default,
                          (g, x.detach(), W.row_indices, W.col_indices, 32, 32, backend))


def test_auto_runs_dense_above_crossover(monkeypatch):
    W, _ = make_weight(64, 64, (32, 32), 1.0)
    W = W.float()
    x = torch.randn(5, 64)
    calls = []
    real = torch.ops.sparsekernels.bsr_linear
    monkeypatch.setattr(torch.ops.sparsekernels, "bsr_linear",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    monkeypatch.setenv("SPARSEKERNELS_DENSE_CROSSOVER", "0.9")
    y = sparse_linear(x, W)
    assert calls == []  # density 1.0 >= 0.9: plain dense
    assert_close_to_reference(y, expected(x, W.to_dense().double(), None), F.linear(x, W.to_dense()))


def test_env_forces_backend(monkeypatch):
    W, _ = make_weight(64, 64, (32, 32), 0.5)
    x = torch.randn(5, 64, dtype=torch.float64)
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        sparse_linear(x, W)
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "reference")
    assert_close_to_reference(sparse_linear(x, W), expected(x, W.to_dense(), None), reduction=64)


# ---- bad input: clear errors ---------------------------------------------------------------
def test_error_wrong_input_width():
    W, _ = make_weight(64, 96, (32, 32), 0.5)
    with pytest.raises(ValueError, match=r"wrong input width.*\[\.\.\., 96\]"):
        sparse_linear(torch.randn(4, 95, dtype=torch.float64), W)


def test_error_dtype_mismatch():
    W, _ = make_weight(64, 96, (32, 32), 0.5)
    with pytest.raises(TypeError, match="dtype mismatch"):
        sparse_linear(torch.randn(4, 96), W)  # fp32 input, fp64 weight


def test_error_device_mismatch():
    W, _ = make_weight(64, 96, (32, 32), 0.5)
    with pytest.raises(ValueError, match="device mismatch"):
        sparse_linear(torch.randn(4, 96, dtype=torch.float64, device="meta"), W)


def test_error_bias_shape():
    W, _ = make_weight(64, 96, (32, 32), 0.5)
    with pytest.raises(ValueError, match=r"bias must have shape \[64\]"):
        sparse_linear(torch.randn(4, 96, dtype=torch.float64), W, torch.randn(65, dtype=torch.float64))


def test_error_dense_weight():
    with pytest.raises(TypeError, match="BlockSparseTensor.from_dense"):
        sparse_linear(torch.randn(4, 96), torch.randn(64, 96))


def test_error_explicit_backend_unavailable():
    W, _ = make_weight(64, 96, (32, 32), 0.5)
    with pytest.raises(RuntimeError, match="backend 'cuda' runs CUDA tensors"):
        sparse_linear(torch.randn(4, 96, dtype=torch.float64), W, backend="cuda")
