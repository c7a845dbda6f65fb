"""Property-based tests (hypothesis) of the C++ CPU kernels against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekernels import BlockSparseTensor
from sparsekernels.ops import _ext
from sparsekernels.testing import assert_close_to_reference, random_block_mask

SIZES = st.sampled_from([16, 32, 64, 128])


@pytest.fixture(autouse=True)
def _need_extension():
    if not _ext.has_op("bsr_linear", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")


@settings(max_examples=60, deadline=None)
@given(bm=SIZES, bk=SIZES, rows=st.integers(1, 3), cols=st.integers(1, 3),
       tokens=st.integers(0, 70), density=st.floats(0, 1),
       dtype=st.sampled_from([torch.float32, torch.float64]), with_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_cpu_kernels_match_reference(bm, bk, rows, cols, tokens, density, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    n, k = rows * bm, cols * bk
    mask = random_block_mask((rows, cols), density, g)
    W = BlockSparseTensor.from_dense(torch.randn(n, k, generator=g, dtype=dtype), (bm, bk), mask=mask)
    x = torch.randn(tokens, k, generator=g, dtype=dtype)
    bias = torch.randn(n, generator=g, dtype=dtype) if with_bias else None
    ops = torch.ops.sparsekernels_C
    wd = W.to_dense()

    y = ops.bsr_linear_cpu(x, W.values, W.crow_indices, W.col_indices, bias)
    ref = F.linear(x.double(), wd.double(), None if bias is None else bias.double())
    assert_close_to_reference(y, ref, F.linear(x, wd, bias), reduction=k)

    grad = torch.randn(tokens, n, generator=g, dtype=dtype)
    gx = ops.bsr_dsd_cpu(grad, W.values, W.ccol_indices, W.row_indices_t, W.transpose_perm)
    assert_close_to_reference(gx, grad.double() @ wd.double(), grad @ wd, reduction=n)

    gw = ops.bsr_sdd_cpu(grad, x, W.row_indices, W.col_indices, bm, bk)
    full = grad.double().T @ x.double()
    ref_blocks = full.reshape(rows, bm, cols, bk).permute(0, 2, 1, 3)[W.row_indices.long(),
                                                                         W.col_indices.long()]
    base = (grad.T @ x).reshape(rows, bm, cols, bk).permute(0, 2, 1, 3)[W.row_indices.long(),
                                                                          W.col_indices.long()]
    assert_close_to_reference(gw, ref_blocks, base, reduction=max(tokens, 1))
