"""The fused CPU FFNs' own activations (GELU with a rational erf and ReLU on AVX-512, applied
to the fp32 sums in registers by the bf16 FFN) against float64, seen through an FFN whose two
layers are identities, so its output is act(x) itself. Both ISA paths, every schedule (decode
rows, split units, row chunks)."""

import pytest
import torch
import torch.nn.functional as F

from sparsekernels import BlockSparseTensor
from sparsekernels.formats.functional import sparse_ffn
from sparsekernels.ops.reference.bsr_ffn import activate
from tests.ops.isa_paths import PATHS, use_isa

W = 64  # hidden and intermediate width: two 32x32 identity blocks per layer
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    return use_isa(request.param, monkeypatch, "bsr_ffn")


def identity_ffn(x, activation):
    eye = BlockSparseTensor.from_dense(torch.eye(W, dtype=x.dtype), (32, 32))
    return sparse_ffn(x, eye, None, eye, None, activation, backend="cpu")


def inputs(rows, dtype):
    """A sweep of [-12, 12] (the erf's clamp at |x| = 4 sqrt(2) inside it), random values and
    huge ones, in rows of W."""
    sweep = torch.linspace(-12, 12, rows * W // 2)
    rest = torch.randn(rows * W - sweep.numel()) * 3
    x = torch.cat([sweep, rest])[torch.randperm(rows * W)].reshape(rows, W)
    x[0, :4] = torch.tensor([1e30, -1e30, 1e-30, -0.0])
    return x.to(dtype)


@pytest.mark.parametrize("rows", [3, 9, 200], ids=lambda r: f"T{r}")
@pytest.mark.parametrize("activation", ["gelu", "relu", "none"])
def test_fp32_activation_against_float64(isa, rows, activation):
    x = inputs(rows, torch.float32)
    y = identity_ffn(x, activation)
    ref = activate(x.double(), activation)
    err = (y.double() - ref).abs()
    # a few fp32 roundings of the result, and the erf's own error (below 1e-7) times |x| / 2
    assert (err <= 4 * EPS32 * x.double().abs().clamp(min=1)).all(), err.max()
    torch_err = (F.gelu(x).double() - ref).abs().max() if activation == "gelu" else 0.0
    assert err.max() <= max(2 * torch_err, 4 * EPS32), (err.max(), torch_err)


@pytest.mark.parametrize("rows", [3, 9, 200], ids=lambda r: f"T{r}")
@pytest.mark.parametrize("activation", ["gelu", "relu", "none"])
def test_bf16_activation_rounds_once(isa, rows, activation):
    x = inputs(rows, torch.bfloat16)
    y = identity_ffn(x, activation)
    assert y.dtype == torch.bfloat16
    ref = activate(x.double(), activation)
    # act on the fp32 sum, rounded to bf16 once: half an ulp of bf16, plus the fp32 error
    # (test above), which may move a value across a rounding boundary
    _, exponent = torch.frexp(ref)
    half_ulp = torch.ldexp(torch.ones_like(ref), exponent - 9)
    err = (y.double() - ref).abs()
    assert (err <= half_ulp + 4 * EPS32 * x.double().abs().clamp(min=1)).all(), err.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [3, 200], ids=lambda r: f"T{r}")
def test_nan_stays_nan(isa, dtype, rows):
    x = torch.randn(rows, W).to(dtype)
    x[0, 0] = float("nan")  # the identity's zeros spread it over its 32-column block
    y = identity_ffn(x, "gelu")
    assert y[0, :32].isnan().all()
    assert torch.isfinite(y[0, 32:]).all() and torch.isfinite(y[1:]).all()
