"""SparseLinear stores its blocks transposed on the CPU (the kernel's W.T operand is a view,
never a cached copy): the same numbers as row-major blocks packed per call, and every call
computes with the weights it sees, whatever wrote them (fused optimizers, .data writes,
functional_call, index edits), inside torch.inference_mode too."""

import copy

import pytest
import torch
from torch import nn

from sparsekernels import SparseLinear
from sparsekernels.nn import SparseFFN
from sparsekernels.nn.sparse_linear import lay_out
from sparsekernels.ops import _ext
from sparsekernels.ops.bsr_ffn import activate
from sparsekernels.testing import assert_close_to_reference, random_block_mask

pytestmark = pytest.mark.skipif(not _ext.has_op("bsr_linear", "cpu"),
                                reason="compiled CPU extension not built (make build)")


def layer(n=96, k=128, density=0.4, block=(32, 32), dtype=torch.float32, backend="cpu"):
    mask = random_block_mask((n // block[0], k // block[1]), density)
    return SparseLinear(k, n, block, block_mask=mask, backend=backend, dtype=dtype).eval()


def reference(sl, x):
    w = sl.weight.to_dense().double()
    return x.double() @ w.T + sl.bias.double()


def row_major(sl):
    twin = copy.deepcopy(sl)
    twin.values.data = twin.values.data.contiguous()
    return twin


def test_blocks_are_stored_transposed_with_the_same_logical_shape():
    sl = layer()
    nnz = sl.values.shape[0]
    assert sl.values.shape == (nnz, 32, 32)
    assert sl.values.transpose(1, 2).is_contiguous() and not sl.values.is_contiguous()
    assert sl.packed() is not None and sl.packed().data_ptr() == sl.values.data_ptr()
    assert set(sl.state_dict()) == {"values", "bias", "crow_indices", "col_indices",
                                    "row_indices", "ccol_indices", "row_indices_t",
                                    "transpose_perm"}
    # other devices' kernels read row-major blocks
    meta = lay_out(sl.values.detach().to("meta"))
    assert meta.is_contiguous()
    assert lay_out(sl.values.detach()) is not None


@pytest.mark.parametrize("rows", [1, 3, 40])  # one row; below and above the register tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stored_blocks_give_the_per_call_numbers(rows, dtype):
    sl = layer(dtype=dtype)
    x = torch.randn(rows, 128, dtype=dtype)
    with torch.no_grad():
        stored = sl(x)
        per_call = row_major(sl)(x)
    torch.testing.assert_close(stored, per_call)
    assert_close_to_reference(stored, reference(sl, x),
                              baseline=x @ sl.weight.to_dense().T + sl.bias, reduction=128)


def test_every_call_sees_the_weights_as_they_are_now():
    sl = layer()
    x = torch.randn(40, 128)
    with torch.no_grad():
        sl(x)
        sl.values.mul_(-3)  # an in-place write
        torch.testing.assert_close(sl(x), reference(sl, x).float())
        sl.values.data.zero_()  # through .data: no version counter moves
        torch.testing.assert_close(sl(x), sl.bias.expand(40, -1))
        sl.values.data.normal_()
        torch.testing.assert_close(sl(x), reference(sl, x).float())
        other = layer()
        other.load_state_dict(sl.state_dict())
        torch.testing.assert_close(other(x), reference(sl, x).float())
        sl.double()
        assert sl.values.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(sl(x.double()), reference(sl, x))


def test_a_fused_optimizer_step_is_seen():
    sl = layer().train()
    x = torch.randn(40, 128)
    opt = torch.optim.Adam(sl.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        before = sl(x)
    sl(x).square().sum().backward()
    version = sl.values._version
    opt.step()  # fused Adam does not bump version counters
    assert sl.values._version == version
    assert sl.values.transpose(1, 2).is_contiguous()
    with torch.no_grad():
        after = sl(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference(sl, x).float())


def test_functional_call_with_other_values_uses_them():
    sl = layer()
    x = torch.randn(40, 128)
    new = torch.randn_like(sl.values)  # row-major: the op packs it for this call
    with torch.no_grad():
        sl(x)
        got = torch.func.functional_call(sl, {"values": new}, (x,))
        twin = copy.deepcopy(sl)
        twin.values.data.copy_(new)
        torch.testing.assert_close(got, reference(twin, x).float())
        torch.testing.assert_close(sl(x), reference(sl, x).float())  # own values again


def test_an_index_edited_in_place_is_used():
    mask = torch.tensor([[True, False, False, True]] * 3)
    sl = SparseLinear(128, 96, (32, 32), block_mask=mask, backend="cpu").eval()
    x = torch.randn(40, 128)
    with torch.no_grad():
        sl(x)
        sl.col_indices.copy_(torch.tensor([1, 2] * 3, dtype=torch.int32))  # still sorted
        flipped = torch.zeros(3, 4, dtype=torch.bool)
        flipped[:, 1:3] = True
        w = torch.zeros(96, 128, dtype=torch.float64)
        for e, (r, c) in enumerate(flipped.nonzero().tolist()):
            w[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = sl.values[e].double()
        torch.testing.assert_close(sl(x), (x.double() @ w.T + sl.bias.double()).float())


def test_built_and_called_under_inference_mode():
    with torch.inference_mode():
        sl = SparseLinear.from_linear(nn.Linear(128, 96), (32, 32), sparsity=0.5, backend="cpu")
        x = torch.randn(5, 128)
        y = sl(x)
        torch.testing.assert_close(y, reference(sl, x).float())
        ffn = SparseFFN.from_linears(nn.Linear(128, 256), nn.Linear(256, 128), "gelu",
                                     (32, 32), sparsity=0.5)
        h = activate(reference(ffn.fc1, x), "gelu")
        want = h @ ffn.fc2.weight.to_dense().double().T + ffn.fc2.bias.double()
        assert_close_to_reference(ffn(x), want, reduction=256)
    # and a layer built outside, called inside
    sl = layer()
    with torch.inference_mode():
        torch.testing.assert_close(sl(torch.ones(2, 128)), reference(sl, torch.ones(2, 128)).float())


def test_gradients_flow_when_needed():
    sl = layer().train()
    x = torch.randn(40, 128, requires_grad=True)
    sl(x).square().sum().backward()
    w = sl.weight.to_dense()
    torch.testing.assert_close(x.grad, 2 * (x @ w.T + sl.bias) @ w)
    assert sl.values.grad is not None and sl.values.grad.shape == sl.values.shape


@pytest.mark.parametrize("rows", [1, 5, 40])  # bsr_linear twice below the fused kernel's rows
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_fused_ffn_on_stored_blocks_gives_the_per_call_numbers(rows, activation):
    fc1, fc2 = layer(256, 128), layer(128, 256)
    ffn = SparseFFN(fc1, fc2, activation).eval()
    x = torch.randn(rows, 128)
    with torch.no_grad():
        stored = ffn(x)
        per_call = torch.ops.sparsekernels.bsr_ffn(x, *row_major(fc1).op_args(), fc1.bias,
                                                   *row_major(fc2).op_args(), fc2.bias,
                                                   activation, "cpu")
    torch.testing.assert_close(stored, per_call)
    h = activate(reference(fc1, x), activation)
    want = h @ fc2.weight.to_dense().double().T + fc2.bias.double()
    assert_close_to_reference(stored, want, reduction=256)


def test_the_kernel_refuses_a_wrong_packed_tensor():
    sl = layer()
    x = torch.randn(40, 128)
    op = _ext.op("bsr_linear", "cpu")
    args = (x, sl.values.detach(), sl.crow_indices, sl.col_indices, None)
    with pytest.raises(RuntimeError, match="packed must be values.transpose"):
        op(*args, torch.zeros(sl.values.shape[0] + 1, 32, 32))
    with pytest.raises(RuntimeError, match="packed must be a contiguous"):
        op(*args, sl.values.detach().contiguous().transpose(1, 2))  # not contiguous
