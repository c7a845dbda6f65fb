"""BlockSparseTensor: exact round trips, the transposed index, and the tensor protocol."""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekernels import BlockSparseTensor
from sparsekernels.formats import topk_block_mask
from sparsekernels.testing import random_block_mask

SIZES = st.sampled_from([16, 32, 64, 128])


@settings(max_examples=40, deadline=None)
@given(bm=SIZES, bk=SIZES, rows=st.integers(1, 3), cols=st.integers(1, 3),
       density=st.floats(0, 1), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(bm, bk, rows, cols, density, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows * bm, cols * bk, generator=g).to(dtype)
    mask = random_block_mask((rows, cols), density, g)
    W = BlockSparseTensor.from_dense(w, (bm, bk), mask=mask)
    expected = w * mask.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    assert torch.equal(W.to_dense(), expected)
    assert W.nnz_blocks == int(mask.sum())
    assert torch.equal(W.block_mask(), mask)
    # the transposed index lists the same blocks in column-major order
    perm = W.transpose_perm.long()
    assert torch.equal(W.col_indices[perm].sort(stable=True).values, W.col_indices[perm])
    assert torch.equal(W.row_indices[perm], W.row_indices_t)
    ccol = torch.bincount(W.col_indices.long(), minlength=cols).cumsum(0)
    assert torch.equal(W.ccol_indices[1:].long(), ccol)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.05, 0.95))
def test_element_mask_keeps_partial_blocks(seed, p):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 96, generator=g)
    mask = (torch.rand(64, 96, generator=g) < p * 0.02).float()  # sparse elements: many empty blocks
    W = BlockSparseTensor.from_dense(w, (32, 32), mask=mask)
    assert torch.equal(W.to_dense(), w * mask)
    blocks_with_kept = mask.reshape(2, 32, 3, 32).sum((1, 3)) > 0
    assert W.nnz_blocks == int(blocks_with_kept.sum())


def test_no_mask_stores_nonzero_blocks():
    w = torch.randn(64, 64)
    w[:32, 32:] = 0
    W = BlockSparseTensor.from_dense(w, 32)
    assert W.nnz_blocks == 3
    assert torch.equal(W.to_dense(), w)


def test_topk_keeps_exact_count_of_largest_blocks():
    w = torch.randn(128, 128)
    for sparsity in (0.0, 0.1, 0.5, 0.9, 1.0):
        mask = topk_block_mask(w, (32, 32), sparsity)
        assert int(mask.sum()) == round((1 - sparsity) * 16)
        norms = w.reshape(4, 32, 4, 32).pow(2).sum((1, 3))
        if 0 < mask.sum() < 16:
            assert norms[mask].min() >= norms[~mask].max()


def test_tensor_protocol():
    w = torch.randn(64, 96)
    W = BlockSparseTensor.from_dense(w, (32, 32), mask=random_block_mask((2, 3), 0.5))
    assert W.shape == (64, 96) and W.dtype == torch.float32
    H = W.half()
    assert isinstance(H, BlockSparseTensor) and H.dtype == torch.float16
    assert H.crow_indices.dtype == torch.int32
    assert torch.equal(H.to_dense(), W.to_dense().half())
    D = W.to(torch.float64)
    assert torch.equal(D.to_dense(), W.to_dense().double())
    C = W.clone()
    C.values.zero_()
    assert W.to_dense().abs().sum() > 0  # clone does not share storage
    assert torch.equal(W.detach().to_dense(), W.to_dense())
    back = pickle.loads(pickle.dumps(W))
    assert isinstance(back, BlockSparseTensor) and torch.equal(back.to_dense(), W.to_dense())
    x = torch.randn(5, 96)
    y = torch.nn.functional.linear(x, W)  # routed to bsr_linear
    torch.testing.assert_close(y, x @ W.to_dense().T)
    with pytest.raises(NotImplementedError, match=r"\.to_dense\(\)"):
        W + 1


def test_as_module_buffer_state_dict():
    m = torch.nn.Module()
    W = BlockSparseTensor.from_dense(torch.randn(32, 32), 16)
    m.register_buffer("w", W)
    sd = m.state_dict()
    assert isinstance(sd["w"], BlockSparseTensor)
    assert torch.equal(sd["w"].to_dense(), W.to_dense())


@pytest.mark.parametrize("bad, match", [
    (dict(block_size=(24, 32)), "unsupported block size"),
    (dict(block_size=(32, 32), shape=(48, 64)), "not divisible by block size"),
    (dict(block_size=(16, 16), mask_shape=(3, 3)), "fits neither"),
])
def test_errors(bad, match):
    shape = bad.get("shape", (64, 64))
    w = torch.randn(*shape)
    mask = torch.ones(bad["mask_shape"]) if "mask_shape" in bad else None
    with pytest.raises(ValueError, match=match):
        BlockSparseTensor.from_dense(w, bad["block_size"], mask=mask)
