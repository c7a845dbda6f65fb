"""The CPU bsr_linear at decode (fewer rows than a register tile): the tiled path on packed
W.T blocks, the dot path on the blocks as stored, the rule between them, and its threshold
(sparsekernels_C::bsr_tile_rows_cpu) against a float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from sparsekernels import BlockSparseTensor
from sparsekernels.ops import _ext
from sparsekernels.ops.bsr_linear import pack
from sparsekernels.testing import assert_close_to_reference, random_block_mask

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
BLOCKS = [(16, 16), (32, 32), (64, 16), (16, 128), (128, 64)]


@pytest.fixture(autouse=True)
def _need_extension():
    if not _ext.has_op("bsr_tile_rows", "cpu"):
        pytest.skip("compiled CPU extension (with bsr_tile_rows) not built (make build)")


def linear(x, w, bias=None, packed=None):
    return _ext.op("bsr_linear", "cpu")(x, w.values, w.crow_indices, w.col_indices, bias, packed)


def tile_rows(dtype, block_out):
    return _ext.op("bsr_tile_rows", "cpu")(dtype, block_out)


def weight(n, k, block, density, dtype, empty=True):
    mask = random_block_mask((n // block[0], k // block[1]), density)
    if empty and mask.shape[0] > 2:
        mask[1] = False  # an empty block row: the bias there
    w = torch.randn(n, k, dtype=torch.float64)
    return BlockSparseTensor.from_dense(w, block, mask).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("packed", [False, True], ids=["stored", "packed"])
def test_every_row_count_matches_reference(dtype, block, density, packed):
    dtype = DTYPES[dtype]
    n, k = 4 * block[0], 3 * block[1]
    w = weight(n, k, block, density, dtype)
    bias = torch.randn(n, dtype=dtype)
    wd = w.to_dense()
    p = pack(w.values) if packed else None
    for rows in range(0, tile_rows(dtype, block[0]) + 3):
        x = torch.randn(rows, k, dtype=dtype)
        y = linear(x, w, bias, p)
        ref = F.linear(x.double(), wd.double(), bias.double())
        assert_close_to_reference(y, ref, F.linear(x, wd, bias), reduction=k, name=f"{rows} rows")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
def test_a_row_does_not_depend_on_the_rows_beside_it(dtype, block):
    """Packed: the tiled path for every row count. Stored: the dot path below the tile
    threshold. Either way each row's sum runs in one fixed order, so a batch equals its rows
    computed one at a time, bit for bit (decode == prefill of the same token)."""
    dtype = DTYPES[dtype]
    n, k = 3 * block[0], 4 * block[1]
    w = weight(n, k, block, 0.5, dtype)
    bias = torch.randn(n, dtype=dtype)
    p = pack(w.values)
    limit = tile_rows(dtype, block[0])
    for rows in (2, limit - 1, limit + 1, 2 * limit + 3):
        if rows < 2:
            continue
        x = torch.randn(rows, k, dtype=dtype)
        alone = torch.cat([linear(x[t:t + 1], w, bias, p) for t in range(rows)])
        assert torch.equal(linear(x, w, bias, p), alone)
        if rows < limit:
            alone = torch.cat([linear(x[t:t + 1], w, bias) for t in range(rows)])
            assert torch.equal(linear(x, w, bias), alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
def test_the_rule_switches_at_the_tile_threshold(dtype):
    """Without packed blocks, a full register tile of rows packs per call and runs the tiled
    kernel (the packed call's numbers exactly); one row fewer runs dot products on the stored
    blocks. bsr_tile_rows_cpu gives that threshold for the compute type and block height."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    lanes = 64 // torch.empty(0, dtype=compute).element_size()
    for bo in (16, 32, 64, 128):
        vectors = bo // lanes
        assert tile_rows(dtype, bo) == (1 if vectors >= 24 else 24 // vectors)
    w = weight(96, 128, (32, 32), 0.5, dtype)
    p = pack(w.values)
    limit = tile_rows(dtype, 32)
    x = torch.randn(limit, 128, dtype=dtype)
    assert torch.equal(linear(x, w, None), linear(x, w, None, p))
    with pytest.raises(RuntimeError, match="unsupported block size 48"):
        tile_rows(dtype, 48)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["stored", "packed"])
def test_more_threads_than_block_rows(threads, packed):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = weight(64, 96, (32, 32), 0.5, torch.float32, empty=False)  # 2 block rows
        x = torch.randn(3, 96)
        y = linear(x, w, None, pack(w.values) if packed else None)
        assert_close_to_reference(y, x.double() @ w.to_dense().double().T,
                                  x @ w.to_dense().T, reduction=96)
    finally:
        torch.set_num_threads(old)


def test_strided_rows():
    """Rows with a stride larger than their width (a slice of a wider activation)."""
    w = weight(64, 96, (32, 32), 0.5, torch.float32)
    x = torch.randn(5, 200)[:, 7:103]
    for p in (None, pack(w.values)):
        y = linear(x, w, None, p)
        assert_close_to_reference(y, x.double() @ w.to_dense().double().T,
                                  x @ w.to_dense().T, reduction=96)


def test_wrong_index_arrays_are_refused():
    w = weight(64, 96, (32, 32), 0.5, torch.float32)
    x = torch.randn(2, 96)
    op = _ext.op("bsr_linear", "cpu")
    with pytest.raises(RuntimeError, match="blocks but"):
        op(x, w.values[1:], w.crow_indices, w.col_indices, None)
    bad = w.crow_indices.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="crow_indices must run from 0"):
        op(x, w.values, bad, w.col_indices, None)
    with pytest.raises(RuntimeError, match="bias has 63 values"):
        op(x, w.values, w.crow_indices, w.col_indices, torch.randn(63))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_blocks_stored_transposed_are_packed_for_free(dtype):
    """values laid out as W.T blocks (values.transpose(1, 2) contiguous: how a SparseLinear
    stores them on the CPU) run the tiled path at every row count without a per-call copy:
    the numbers of the call given those blocks as `packed`, bit for bit."""
    dtype = DTYPES[dtype]
    w = weight(96, 128, (32, 32), 0.5, dtype)
    p = pack(w.values)
    stored = p.transpose(1, 2)
    assert stored.shape == w.values.shape and not stored.is_contiguous()
    op = _ext.op("bsr_linear", "cpu")
    for rows in (1, 3, 30):
        x = torch.randn(rows, 128, dtype=dtype)
        got = op(x, stored, w.crow_indices, w.col_indices, None)
        assert torch.equal(got, linear(x, w, None, p))

