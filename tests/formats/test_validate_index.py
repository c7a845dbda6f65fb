"""validate_index: a block-sparse index from outside (from_parts, the constructor, a pickle,
SparseLinear.load_state_dict) is checked once, and every damaged one is refused with a
message naming the tensor; valid ones of every shape pass."""

import pickle
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekernels import BlockSparseTensor, SparseLinear
from sparsekernels.formats import InvalidIndexError, validate_index
from sparsekernels.formats.block_sparse import INDEX_NAMES, INNER_NAMES, _rebuild
from sparsekernels.testing import random_block_mask
from tests.formats.index_corruptions import damaged_index, damaged_values

SIZES = st.sampled_from([16, 32, 64, 128])


def random_weight(bm, bk, rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows * bm, cols * bk, generator=g)
    return BlockSparseTensor.from_dense(w, (bm, bk), mask=random_block_mask((rows, cols), density, g))


class _Pickled:
    """Pickles as a BlockSparseTensor with the given parts (what a crafted file holds)."""

    def __init__(self, inner, shape):
        self.inner, self.shape = inner, shape

    def __reduce__(self):
        return (_rebuild, (self.inner, self.shape))


@settings(max_examples=25, deadline=None)
@given(bm=SIZES, bk=SIZES, rows=st.integers(1, 4), cols=st.integers(1, 4),
       density=st.sampled_from([0.0, 0.3, 0.7, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_valid_index_passes_every_path(bm, bk, rows, cols, density, seed):
    W = random_weight(bm, bk, rows, cols, density, seed)
    validate_index(W.values, W.index(), W.shape)
    again = BlockSparseTensor.from_parts(W.values, W.index(), W.shape)
    assert torch.equal(again.to_dense(), W.to_dense())
    direct = BlockSparseTensor(*(getattr(W, n) for n in INNER_NAMES), shape=W.shape)
    assert torch.equal(direct.to_dense(), W.to_dense())
    back = pickle.loads(pickle.dumps(W))
    assert torch.equal(back.to_dense(), W.to_dense())


def _refused_everywhere(values, index, shape, tensor_name):
    """Every construction path from outside data refuses, naming the damaged tensor (as the
    one at fault, or as the one a derived array disagrees with)."""
    pattern = rf"^BlockSparseTensor\.(\w+: .*)?\b{tensor_name}\b"
    with pytest.raises(InvalidIndexError, match=pattern):
        validate_index(values, index, shape)
    with pytest.raises(InvalidIndexError, match=pattern):
        BlockSparseTensor.from_parts(values, index, shape)
    with pytest.raises(InvalidIndexError, match=pattern):
        BlockSparseTensor(values, *(index[n] for n in INDEX_NAMES), shape=shape)
    data = pickle.dumps(_Pickled((values,) + tuple(index[n] for n in INDEX_NAMES), tuple(shape)))
    with pytest.raises(InvalidIndexError, match=pattern):
        pickle.loads(data)


@pytest.mark.parametrize("name", INDEX_NAMES)
@settings(max_examples=8, deadline=None)
@given(bm=SIZES, bk=SIZES, rows=st.integers(1, 4), cols=st.integers(1, 4),
       density=st.sampled_from([0.0, 0.3, 0.7, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_each_damaged_index_array_is_refused(name, bm, bk, rows, cols, density, seed):
    W = random_weight(bm, bk, rows, cols, density, seed)
    cases = damaged_index(getattr(W, name), random.Random(seed))
    assert cases
    for label, bad in cases:
        index = dict(W.index(), **{name: bad})
        try:
            _refused_everywhere(W.values, index, W.shape, name)
        except BaseException as e:  # say which case, then fail
            raise AssertionError(f"{name} {label}: {e}") from e


@settings(max_examples=15, deadline=None)
@given(bm=SIZES, bk=SIZES, rows=st.integers(1, 4), cols=st.integers(1, 4),
       density=st.sampled_from([0.0, 0.3, 0.7, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_damaged_values_are_refused(bm, bk, rows, cols, density, seed):
    W = random_weight(bm, bk, rows, cols, density, seed)
    for label, bad in damaged_values(W.values, in_memory=True):
        try:
            with pytest.raises(InvalidIndexError, match=r"BlockSparseTensor\.(values|crow_indices|"
                                                         r"col_indices)"):
                BlockSparseTensor.from_parts(bad, W.index(), W.shape)
        except BaseException as e:
            raise AssertionError(f"values {label}: {e}") from e


@pytest.mark.parametrize("case, match", [
    ("crow not monotone", r"crow_indices: must not decrease"),
    ("crow end", r"crow_indices: must end at nnz"),
    ("crow start", r"crow_indices: must start at 0"),
    ("col out of range", r"col_indices: entries must lie in \[0, 4\)"),
    ("col unsorted", r"col_indices: must be strictly increasing"),
    ("perm duplicate", r"transpose_perm: is not a permutation"),
    ("missing", r"row_indices: missing"),
    ("other device", r"is on meta"),
])
def test_messages_say_what_is_wrong(case, match):
    W = BlockSparseTensor.from_dense(torch.randn(64, 64), 16,
                                     mask=torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0],
                                                        [1, 0, 1, 0], [0, 1, 1, 1]]))
    index = {n: t.clone() for n, t in W.index().items()}  # crow [0, 3, 3, 5, 8]
    if case == "crow not monotone":
        index["crow_indices"][1:3] = torch.tensor([4, 3], dtype=torch.int32)
    elif case == "crow end":
        index["crow_indices"][-1] = 50000
    elif case == "crow start":
        index["crow_indices"][0] = 1
    elif case == "col out of range":
        index["col_indices"][0] = 4
    elif case == "col unsorted":
        index["col_indices"][0:2] = torch.tensor([1, 0], dtype=torch.int32)
    elif case == "perm duplicate":
        index["transpose_perm"][0] = index["transpose_perm"][1]
    elif case == "missing":
        del index["row_indices"]
    elif case == "other device":
        index["ccol_indices"] = index["ccol_indices"].to("meta")
    with pytest.raises(InvalidIndexError, match=match):
        BlockSparseTensor.from_parts(W.values, index, W.shape)


def test_meta_tensors_check_the_format_only():
    W = BlockSparseTensor.from_dense(torch.randn(64, 32), 16)
    meta = {n: t.to("meta") for n, t in W.index().items()}
    B = BlockSparseTensor.from_parts(W.values.to("meta"), meta, W.shape)
    assert B.device.type == "meta"
    meta["col_indices"] = meta["col_indices"].long()
    with pytest.raises(InvalidIndexError, match="col_indices: must be int32"):
        BlockSparseTensor.from_parts(W.values.to("meta"), meta, W.shape)


# --- SparseLinear.load_state_dict -----------------------------------------------------------
def _module_state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", INNER_NAMES)
def test_sparse_linear_load_state_dict_refuses_damaged_layout(name):
    rng = random.Random(7)
    g = torch.Generator().manual_seed(7)
    src = SparseLinear(96, 64, (16, 16), block_mask=random_block_mask((4, 6), 0.5, g))
    dst = SparseLinear(96, 64, (16, 16), block_mask=random_block_mask((4, 6), 0.3, g))
    sd = src.state_dict()
    cases = (damaged_values(sd[name], in_memory=True) if name == "values"
             else damaged_index(sd[name], rng))
    before = _module_state(dst)
    for label, bad in cases:
        with pytest.raises(RuntimeError, match=rf"SparseLinear\.(\w+: .*)?\b(values|{name})\b"):
            dst.load_state_dict(dict(sd, **{name: bad}))
        after = _module_state(dst)
        assert after.keys() == before.keys(), label
        assert all(torch.equal(after[k], before[k]) for k in before), label
    dst.load_state_dict(sd)  # the undamaged layout (another nnz) loads and computes as src
    x = torch.randn(3, 96)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_sparse_linear_partial_load_checks_the_combination():
    g = torch.Generator().manual_seed(3)
    a = SparseLinear(64, 64, 16, block_mask=random_block_mask((4, 4), 0.5, g))
    b = SparseLinear(64, 64, 16, block_mask=random_block_mask((4, 4), 0.5, g))
    assert not torch.equal(a.col_indices, b.col_indices)
    # b's columns with a's rows and transposed index: every array valid alone, not together
    with pytest.raises(RuntimeError, match="SparseLinear|_indices|transpose_perm"):
        a.load_state_dict({"col_indices": b.col_indices}, strict=False)


# --- masks given to from_dense / from_linear ------------------------------------------------
@pytest.mark.parametrize("value", [0.5, float("nan"), 2.0, -1.0])
@pytest.mark.parametrize("kind", ["element", "block"])
def test_from_dense_refuses_non_binary_masks(kind, value):
    w = torch.randn(64, 32)
    mask = torch.ones(64, 32) if kind == "element" else torch.ones(4, 2)
    mask[0, 0] = value
    with pytest.raises(ValueError, match="other than 0 and 1"):
        BlockSparseTensor.from_dense(w, 16, mask=mask)
    linear = torch.nn.Linear(32, 64)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        SparseLinear.from_linear(linear, 16, mask=mask)


@pytest.mark.parametrize("mask", [torch.ones(64, 32), torch.ones(64, 32).bool(),
                                  torch.ones(4, 2, dtype=torch.int8), torch.zeros(4, 2)],
                         ids=["float", "bool", "int8-block", "zero-block"])
def test_from_dense_accepts_binary_masks(mask):
    w = torch.randn(64, 32)
    W = BlockSparseTensor.from_dense(w, 16, mask=mask)
    full = mask.float() if mask.shape == w.shape else mask.float().repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(W.to_dense(), w * full)


# --- GPU (make test-gpu) ------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_index_is_checked_on_its_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    W = random_weight(32, 16, 3, 4, 0.5, 11).to("cuda")
    validate_index(W.values, W.index(), W.shape)
    for name in INDEX_NAMES:
        for label, bad in damaged_index(getattr(W, name).cpu(), random.Random(5), True):
            index = dict(W.index(), **{name: bad.to("cuda")})
            with pytest.raises(InvalidIndexError, match=rf"\b{name}\b"):
                BlockSparseTensor.from_parts(W.values, index, W.shape)
    cpu_index = dict(W.index(), col_indices=W.col_indices.cpu())
    with pytest.raises(InvalidIndexError, match="col_indices: is on cpu, values on cuda"):
        BlockSparseTensor.from_parts(W.values, cpu_index, W.shape)
    # a CUDA layer loads a CPU state dict (the usual checkpoint) and checks it
    layer = SparseLinear(64, 96, (32, 16), bias=False, device="cuda")
    sd = {n: t.cpu() for n, t in SparseLinear.from_block_sparse(W.cpu()).state_dict().items()}
    layer.load_state_dict(sd)
    assert torch.equal(layer.weight.to_dense().cpu(), W.to_dense().cpu())
    with pytest.raises(RuntimeError, match="crow_indices: must start at 0"):
        layer.load_state_dict(dict(sd, crow_indices=sd["crow_indices"] + 1))
