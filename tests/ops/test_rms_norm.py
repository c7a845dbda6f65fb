"""sparsekernels::rms_norm against torch's arithmetic and float64, fp32 and bf16, on the
AVX-512 and the portable paths; the Llama-style (rounded before the weight) and the fp32
product (Gemma, torch.nn.RMSNorm) forms; refusals; the gradient path."""

import pytest
import torch
from torch.library import opcheck

from sparsekernels.ops import _ext
from sparsekernels.ops.rms_norm import rms_norm, torch_rms_norm
from tests.ops.isa_paths import PATHS, use_isa


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    return use_isa(request.param, monkeypatch, "rms_norm")


def float64(x, w, eps, offset):
    h = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    return h if w is None else h * (w.double() + 1 if offset else w.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 16, 37, 576], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("rows", [1, 5, 300], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("form", ["llama", "gemma", "fp32_product", "no_weight"])
def test_matches_torch_and_float64(isa, dtype, n, rows, form):
    offset, round_normed = {"llama": (False, True), "gemma": (True, False),
                            "fp32_product": (False, False), "no_weight": (False, True)}[form]
    x = (torch.randn(rows, n) * 4).to(dtype)
    w = None if form == "no_weight" else torch.randn(n).to(dtype)
    y = rms_norm(x, w, 1e-6, offset, round_normed)
    assert y.dtype == dtype and y.shape == x.shape
    want = torch_rms_norm(x, w, 1e-6, offset, round_normed)  # the families' own arithmetic
    exact = float64(x, w, 1e-6, offset)
    scale = exact.abs().max().clamp_min(1)
    if dtype == torch.float32:
        assert (y.double() - exact).abs().max() <= 2e-6 * scale
        assert (y - want).abs().max() <= 2e-6 * scale
    else:  # one or two roundings to bf16 of fp32 values
        assert ((y.double() - exact).abs() <= exact.abs() * 2.0 ** -7 + 1e-6 * scale).all()
        # torch's form within two ulps: its rms differs in the last fp32 bits (another
        # summation order), which can flip the first rounding and then the second
        assert ((y.double() - want.double()).abs() <= want.double().abs() * 2.0 ** -6
                + 1e-6 * scale).all()


def test_rows_do_not_depend_on_the_call(isa):
    x, w = torch.randn(300, 96), torch.randn(96)
    whole = rms_norm(x, w, 1e-6)
    for i in (0, 150, 299):
        assert torch.equal(rms_norm(x[i:i + 1], w, 1e-6), whole[i:i + 1])


def test_eps_and_strides(isa):
    x = torch.randn(5, 3, 32).transpose(0, 1) * 1e-3  # not contiguous; rms ~1e-3
    w = torch.randn(32)
    y = rms_norm(x, w, 1.0)  # eps dominates
    assert torch.allclose(y.double(), float64(x, w, 1.0, False), atol=1e-7, rtol=1e-5)


def test_nan_stays_in_its_row(isa):
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(3, 40).to(dtype), torch.randn(40).to(dtype)
        x[1, 3] = float("nan")
        y = rms_norm(x, w, 1e-6)
        assert y[1].isnan().all() and not y[0].isnan().any() and not y[2].isnan().any()


def test_gradient_path_is_torch():
    x = torch.randn(4, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    y = rms_norm(x, w, 1e-6)
    assert y.grad_fn is not None
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    x2, w2 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ex, ew = torch.autograd.grad(float64(x2, w2, 1e-6, False).square().sum(), (x2, w2))
    assert torch.allclose(gx.double(), ex, atol=1e-4, rtol=1e-4)
    assert torch.allclose(gw.double(), ew, atol=1e-4, rtol=1e-4)


def test_bad_input_refused():
    x, w = torch.randn(4, 32), torch.randn(32)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, w[:-1], 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, float("nan"))
    with pytest.raises(ValueError, match="last dimension"):
        rms_norm(torch.tensor(1.0), None, 1e-6)


def test_kernel_refuses_mismatched_operands(isa):
    op = _ext.op("rms_norm", "cpu")
    with pytest.raises(RuntimeError, match="weight"):
        op(torch.randn(4, 32), torch.randn(8), 1e-6, False, True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(torch.randn(4, 32).double(), None, 1e-6, False, True)


def test_other_dtypes_take_torch():
    x, w = torch.randn(5, 24).double(), torch.randn(24).double()
    assert torch.allclose(rms_norm(x, w, 1e-6), float64(x, w, 1e-6, False))


def test_opcheck(isa):
    opcheck(torch.ops.sparsekernels.rms_norm, (torch.randn(6, 32), torch.randn(32), 1e-6,
                                               False, True),
            test_utils=("test_schema", "test_faketensor"))
