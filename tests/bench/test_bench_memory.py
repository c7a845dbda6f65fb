"""The bench suite's peak-memory measurement counts what a forward allocates, once."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import common  # noqa: E402


def test_model_bytes_counts_block_sparse_storage_and_ties_once():
    from sparsekernels import SparseLinear

    lin = torch.nn.Linear(256, 128)
    dense = common.model_bytes(lin)
    assert dense == (256 * 128 + 128) * 4
    sparse = SparseLinear.from_linear(lin, block_size=(32, 32), sparsity=0.75)
    got = common.model_bytes(sparse)
    values = 8 * 32 * 32 * 4  # 32 blocks of 32x32 in the grid, a quarter kept
    assert values + 128 * 4 <= got < values + 128 * 4 + 4096  # + the small block index
    tied = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100, bias=False))
    tied[1].weight = tied[0].weight
    assert common.model_bytes(tied) == 100 * 16 * 4


def test_peak_activation_bytes_sees_the_largest_live_set():
    if common._heap_in_use() is None:
        pytest.skip("needs glibc's mallinfo2")
    n = int(torch.randint(256, 512, ()).item())

    def fn():
        a = torch.ones(n, 1024)        # n KiB x 4
        b = a * 2                      # both live: the peak
        del a
        return b.sum()

    peak = common.peak_activation_bytes(fn, torch.device("cpu"))
    expect = 2 * n * 1024 * 4
    assert expect <= peak < expect + 256 * 1024, (peak, expect)
