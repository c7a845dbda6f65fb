"""sparsekernels::add_layer_norm: layer_norm(x + residual) against float64, in fp32 and bf16,
on the AVX-512 and the portable paths; refusals; the gradient path."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from sparsekernels.ops import _ext
from sparsekernels.ops.add_layer_norm import add_layer_norm
from tests.ops.isa_paths import PATHS, use_isa


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    return use_isa(request.param, monkeypatch, "add_layer_norm")


def reference(x, r, w, b, eps):
    n = x.shape[-1]
    return F.layer_norm(x.double() + r.double(), (n,), None if w is None else w.double(),
                        None if b is None else b.double(), eps)


def inputs(rows, n, dtype, affine=True):
    # an offset and a spread per row, as residual streams have
    x = (torch.randn(rows, n) * 3 + torch.randn(rows, 1) * 5).to(dtype)
    r = torch.randn(rows, n).to(dtype)
    w = torch.randn(n).to(dtype) if affine else None
    b = torch.randn(n).to(dtype) if affine else None
    return x, r, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 16, 37, 768], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("rows", [1, 5, 300], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_matches_float64(isa, dtype, n, rows, affine):
    x, r, w, b = inputs(rows, n, dtype, affine)
    eps = 1e-5 if n > 1 else 1e-2  # one column: the output is the bias (0 / eps)
    y = add_layer_norm(x, r, w, b, eps)
    want = reference(x, r, w, b, eps)
    assert y.dtype == dtype and y.shape == x.shape
    err = (y.double() - want).abs()
    if dtype == torch.float32:
        assert err.max() <= 1e-5 * want.abs().max().clamp_min(1)
    else:  # one rounding to bf16 of a value computed in fp32
        assert (err <= want.abs() * 2.0 ** -8 + 1e-5 * want.abs().max().clamp_min(1)).all()
        # and no worse than torch's two ops, which round x + r to bf16 first
        torch_err = (F.layer_norm(x + r, (n,), w, b, eps).double() - want).abs()
        assert err.mean() <= torch_err.mean() + 1e-6


def test_weights_in_fp32_with_bf16_rows(isa):
    x, r, w, b = inputs(7, 64, torch.bfloat16)
    y = add_layer_norm(x, r, w.float(), b.float(), 1e-5)
    want = reference(x, r, w, b, 1e-5)
    assert y.dtype == torch.bfloat16
    assert ((y.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-5).all()


def test_rows_do_not_depend_on_the_call(isa):
    x, r, w, b = inputs(300, 96, torch.float32)
    whole = add_layer_norm(x, r, w, b, 1e-5)
    for i in (0, 137, 299):  # threads split 300 rows; one row runs on one thread
        assert torch.equal(add_layer_norm(x[i:i + 1], r[i:i + 1], w, b, 1e-5), whole[i:i + 1])


def test_eps_is_used(isa):
    x, r, w, b = inputs(4, 32, torch.float32)
    x, r = x * 1e-3, r * 1e-3  # variance ~1e-6: eps = 1 changes the result
    y = add_layer_norm(x, r, w, b, 1.0)
    assert torch.allclose(y.double(), reference(x, r, w, b, 1.0), atol=1e-6, rtol=1e-5)


def test_leading_dims_and_strided_inputs(isa):
    x = torch.randn(3, 40, 64).transpose(0, 1)  # [40, 3, 64], not contiguous
    r = torch.randn(40, 3, 64)
    w, b = torch.randn(64), torch.randn(64)
    y = add_layer_norm(x, r, w, b, 1e-5)
    assert y.shape == (40, 3, 64)
    assert torch.allclose(y.double(), reference(x, r, w, b, 1e-5), atol=1e-5)


def test_nan_stays_in_its_row(isa):
    for dtype in (torch.float32, torch.bfloat16):
        x, r, w, b = inputs(3, 48, dtype)
        x[1, 5] = float("nan")
        y = add_layer_norm(x, r, w, b, 1e-5)
        assert y[1].isnan().all()
        assert not y[0].isnan().any() and not y[2].isnan().any()


def test_gradient_path_is_torch():
    x, r, w, b = inputs(6, 32, torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = add_layer_norm(x, r, w, b, 1e-5)
    assert y.grad_fn is not None
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    x2, w2 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    want = F.layer_norm(x2 + r.double(), (32,), w2, b.double(), 1e-5)
    ex, ew = torch.autograd.grad(want.square().sum(), (x2, w2))
    assert torch.allclose(gx.double(), ex, atol=1e-4, rtol=1e-4)
    assert torch.allclose(gw.double(), ew, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (lambda x, r, w, b: (x, r[:, :-1], w, b), "one shape"),
    (lambda x, r, w, b: (x, r.double(), w, b), "one shape and dtype"),
    (lambda x, r, w, b: (x, r, w[:-1], b), "weight must have shape"),
    (lambda x, r, w, b: (x, r, w, b.view(1, -1)), "bias must have shape"),
])
def test_bad_input_refused(bad, match):
    x, r, w, b = inputs(4, 32, torch.float32)
    with pytest.raises(ValueError, match=match):
        add_layer_norm(*bad(x, r, w, b), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        add_layer_norm(x, r, w, b, -1.0)


def test_kernel_refuses_mismatched_operands(isa):
    op = _ext.op("add_layer_norm", "cpu")
    x, r, w, b = inputs(4, 32, torch.float32)
    with pytest.raises(RuntimeError, match="one shape"):
        op(x, r[:2], w, b, 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        op(x, r, w[:8], b, 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(x.double(), r.double(), w, b, 1e-5)


def test_other_dtypes_take_torch():
    x, r, w, b = (t.double() for t in inputs(5, 24, torch.float32))
    assert torch.allclose(add_layer_norm(x, r, w, b, 1e-5), reference(x, r, w, b, 1e-5))


def test_opcheck(isa):
    x, r, w, b = inputs(6, 32, torch.float32)
    opcheck(torch.ops.sparsekernels.add_layer_norm, (x, r, w, b, 1e-5),
            test_utils=("test_schema", "test_faketensor"))
