"""The CPU inference cache of the kernel's W.T blocks (SparseLinear.packed): same numbers
as packing per call, rebuilt when the weights change, never used when a gradient is needed."""

import pytest
import torch
from torch import nn

from sparsekernels import SparseLinear
from sparsekernels.nn import SparseFFN
from sparsekernels.ops import _ext
from sparsekernels.ops.bsr_ffn import activate
from sparsekernels.testing import assert_close_to_reference, random_block_mask

pytestmark = pytest.mark.skipif(not _ext.has_op("bsr_linear", "cpu"),
                                reason="compiled CPU extension not built (make build)")


def layer(n=96, k=128, density=0.4, block=(32, 32), dtype=torch.float32):
    mask = random_block_mask((n // block[0], k // block[1]), density)
    sl = SparseLinear(k, n, block, block_mask=mask, backend="cpu", dtype=dtype)
    return sl.eval()


def reference(sl, x):
    w = sl.weight.to_dense().double()
    return x.double() @ w.T + sl.bias.double()


@pytest.mark.parametrize("rows", [1, 3, 40])  # dot rows; the register tiles, part and whole
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cached_blocks_give_the_per_call_numbers(rows, dtype):
    sl = layer(dtype=dtype)
    x = torch.randn(rows, 128, dtype=dtype)
    with torch.no_grad():
        cached = sl(x)
        assert (sl._packed_cache is None) == (rows == 1)  # one row reads the blocks as stored
        per_call = torch.ops.sparsekernels.bsr_linear(x, *sl.op_args(), sl.bias, "cpu")
    if rows >= 24:  # the same register-tile kernel both ways (below, per call takes dot rows)
        assert torch.equal(cached, per_call)
    assert_close_to_reference(cached, reference(sl, x),
                              baseline=x @ sl.weight.to_dense().T + sl.bias, reduction=128)


def test_cache_follows_in_place_updates_loads_and_moves():
    sl = layer()
    x = torch.randn(40, 128)
    with torch.no_grad():
        sl(x)
        sl.values.mul_(-3)  # an optimizer-style in-place write: the version counter moves
        torch.testing.assert_close(sl(x), reference(sl, x).float())
        other = layer()
        other.load_state_dict(sl.state_dict())  # copy_ into other's values
        torch.testing.assert_close(other(x), reference(sl, x).float())
        sl.double()
        torch.testing.assert_close(sl(x.double()), reference(sl, x))
    assert not any("pack" in key for key in sl.state_dict())


def test_writes_through_data_need_eval_or_clear_cache():
    sl = layer()
    x = torch.randn(40, 128)
    with torch.no_grad():
        sl(x)
        sl.values.data.zero_()  # bypasses the version counter (documented)
        sl.eval()
        torch.testing.assert_close(sl(x), sl.bias.expand(40, -1))
        sl.values.data.fill_(1.0)
        sl.clear_cache()
        torch.testing.assert_close(sl(x), reference(sl, x).float())


def test_no_cache_when_a_gradient_is_needed():
    sl = layer().train()
    x = torch.randn(40, 128, requires_grad=True)
    assert sl.packed(x) is None  # values require grad
    sl(x).sum().backward()
    assert sl.values.grad is not None and x.grad is not None
    sl.requires_grad_(False)
    assert sl.packed(x) is None  # x requires grad: the input gradient must flow
    x.grad = None
    sl(x).square().sum().backward()
    w = sl.weight.to_dense()
    torch.testing.assert_close(x.grad, 2 * (x @ w.T + sl.bias) @ w)
    assert sl.packed(x.detach()) is not None  # nothing needs a gradient
    assert sl._packed_cache is not None


def test_no_cache_off_the_cpu_kernel():
    sl = layer()
    sl.backend = type(sl.backend).parse("reference")
    with torch.no_grad():
        sl(torch.randn(40, 128))
    assert sl._packed_cache is None


@pytest.mark.parametrize("rows", [1, 5, 40])  # bsr_linear twice below the fused kernel's rows
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_fused_ffn_with_cached_blocks_gives_the_per_call_numbers(rows, activation):
    fc1, fc2 = layer(256, 128), layer(128, 256)
    ffn = SparseFFN(fc1, fc2, activation).eval()
    x = torch.randn(rows, 128)
    with torch.no_grad():
        cached = ffn(x)
        assert (fc1._packed_cache is None) == (fc2._packed_cache is None) == (rows == 1)
        per_call = torch.ops.sparsekernels.bsr_ffn(x, *fc1.op_args(), fc1.bias, *fc2.op_args(),
                                                   fc2.bias, activation, "cpu")
    if rows >= 24:  # the fused kernel both ways (below, per call takes dot rows)
        assert torch.equal(cached, per_call)
    h = activate(reference(fc1, x), activation)
    want = h @ fc2.weight.to_dense().double().T + fc2.bias.double()
    assert_close_to_reference(cached, want, reduction=256)


def test_the_kernel_refuses_a_wrong_packed_tensor():
    sl = layer()
    x = torch.randn(40, 128)
    op = _ext.op("bsr_linear", "cpu")
    args = (x, sl.values.detach(), sl.crow_indices, sl.col_indices, None)
    with pytest.raises(RuntimeError, match="packed must be values.transpose"):
        op(*args, torch.zeros(sl.values.shape[0] + 1, 32, 32))
    with pytest.raises(RuntimeError, match="packed must be a contiguous"):
        op(*args, sl.values.detach().transpose(1, 2))  # not contiguous
