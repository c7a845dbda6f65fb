"""Eager calls that need no gradient skip the custom ops' dispatcher and compute the same;
everything that must see the op (autograd, torch function modes, compile) still does."""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sparsekernels import SparseLinear
from sparsekernels.ops import _ext
from sparsekernels.ops.eager import plain_inference


class Seen(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def layer():
    if not _ext.has_op("bsr_linear", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")
    return SparseLinear.from_linear(nn.Linear(64, 96), (32, 32), sparsity=0.5, backend="cpu")


def test_plain_inference_rules():
    x = torch.randn(3, requires_grad=True)
    p = nn.Parameter(torch.randn(3))
    assert plain_inference(torch.randn(3), None)
    assert not plain_inference(x)  # needs a gradient
    with torch.no_grad():
        assert plain_inference(x, p)
    with Seen():
        assert not plain_inference(torch.randn(3))
    sub = torch.randn(3).as_subclass(type("Sub", (torch.Tensor,), {}))
    with torch.no_grad():
        assert not plain_inference(sub)


def test_no_grad_call_runs_the_implementation_directly_with_the_same_result(monkeypatch):
    sl = layer()
    x = torch.randn(5, 64)
    via_op = []
    real = torch.ops.sparsekernels.bsr_linear_packed
    monkeypatch.setattr(torch.ops.sparsekernels, "bsr_linear_packed",
                        lambda *a: via_op.append(1) or real(*a), raising=False)
    with torch.no_grad():
        direct = sl(x)
    assert not via_op
    with Seen() as seen, torch.no_grad():  # a mode active: the call goes through the op
        through = sl(x)
    assert via_op and seen.names
    assert torch.equal(direct, through)
    ref = x.double() @ sl.to_linear().weight.double().T + sl.bias.double()
    assert ((direct.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_a_call_that_needs_a_gradient_goes_through_autograd():
    sl = layer()
    x = torch.randn(5, 64, requires_grad=True)
    y = sl(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and sl.values.grad is not None


def test_compiled_call_sees_the_op():
    sl = layer()
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = sl(x)
        got = torch.compile(sl, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 64), (3, 64, 5)])
def test_direct_entry_takes_any_leading_dims_and_layouts(shape):
    sl = layer()
    x = torch.randn(*shape, 64) if len(shape) == 1 else torch.randn(*shape)
    if shape == (3, 64, 5):
        x = x.transpose(1, 2)  # [3, 5, 64], not contiguous
    with torch.no_grad():
        got = sl(x)
    ref = x.double() @ sl.to_linear().weight.double().T + sl.bias.double()
    assert got.shape == (*x.shape[:-1], 96)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_an_input_the_layer_does_not_take_gets_the_checked_error():
    sl = layer()
    with torch.no_grad(), pytest.raises(ValueError, match="64"):
        sl(torch.randn(4, 32))
    with torch.no_grad(), pytest.raises((TypeError, ValueError), match="float64|dtype"):
        sl(torch.randn(4, 64, dtype=torch.float64))


def test_a_dense_routed_layer_runs_the_kernel_at_decode(monkeypatch):
    """Above the crossover auto goes dense, which for a layer that stores only blocks means
    building the weight each call; at decode row counts the kernel runs instead."""
    if not _ext.has_op("bsr_linear", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")
    monkeypatch.setenv("SPARSEKERNELS_DENSE_CROSSOVER", "0.0")
    sl = SparseLinear.from_linear(nn.Linear(64, 96), (32, 32), sparsity=0.25)
    assert sl.route.dense and sl.route.sparse_below_rows == 17
    dense_calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda *a, **k: dense_calls.append(1) or real(*a, **k))
    w = sl.to_linear()
    for rows, dense in ((1, False), (16, False), (17, True), (40, True)):
        x = torch.randn(rows, 64)
        dense_calls.clear()
        with torch.no_grad():
            got = sl(x)
        assert bool(dense_calls) == dense, rows
        ref = x.double() @ w.weight.double().T + w.bias.double()
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_fused_ffn_runs_its_kernel_directly(gated, dtype, monkeypatch):
    """A fused SparseFFN (plain or gated) calls the extension's direct entry in eager no-grad
    calls: neither the op's dispatcher nor its Python wrapper, with the op's own numbers; a
    mode, or a gradient to record (a trainable bias alone included), takes the op."""
    import sparsekernels.nn.sparse_ffn as sparse_ffn
    from sparsekernels.nn import SparseFFN

    layer()  # skips without the extension
    torch.manual_seed(0)

    def sparse(n, k):
        return SparseLinear.from_linear(nn.Linear(k, n), (32, 32), sparsity=0.5, backend="cpu")

    gate = sparse(128, 64) if gated else None
    ffn = SparseFFN(sparse(128, 64), sparse(64, 128), "silu" if gated else "gelu",
                    gate=gate).eval().to(dtype)
    x = torch.randn(2, 7, 64, dtype=dtype)
    getter, name = ("direct_gated_ffn", "bsr_gated_ffn") if gated else ("direct_ffn", "bsr_ffn")
    direct_calls, via_op = [], []
    entry = getattr(sparse_ffn, getter)()
    assert entry is not None
    monkeypatch.setattr(sparse_ffn, getter,
                        lambda: lambda *a: direct_calls.append(1) or entry(*a))
    for op in (name, name + "_packed"):
        real = getattr(torch.ops.sparsekernels, op)
        monkeypatch.setattr(torch.ops.sparsekernels, op,
                            lambda *a, real=real: via_op.append(1) or real(*a), raising=False)
    with torch.no_grad():
        direct = ffn(x)
    assert direct_calls and not via_op and direct.shape == (2, 7, 64)
    direct_calls.clear()
    with Seen(), torch.no_grad():  # a mode active: the call goes through the op
        through = ffn(x)
    assert via_op and not direct_calls
    assert torch.equal(direct, through)
    for p in ffn.parameters():
        p.requires_grad_(False)
    ffn.fc2.bias.requires_grad_(True)
    ffn(x).float().sum().backward()  # the last bias's gradient: one per output, summed rows
    assert not direct_calls
    torch.testing.assert_close(ffn.fc2.bias.grad.float(), torch.full((64,), 14.0))
