"""sparsekernels::bsr_ffn (fused block-sparse FFN) on every CPU-runnable backend vs float64."""

import pytest
import torch
import torch.nn.functional as F

from sparsekernels import BlockSparseTensor
from sparsekernels.formats.functional import sparse_ffn
from sparsekernels.ops import _ext
from sparsekernels.ops.backend import triton_available, triton_interpret
from sparsekernels.testing import assert_close_to_reference, off_the_kink, random_block_mask

K, HIDDEN, N = 96, 192, 64  # W1 [HIDDEN, K] in 32x16 blocks, W2 [N, HIDDEN] in 16x64 blocks
B1, B2 = (32, 16), (16, 64)
ACTS = ["none", "gelu", "gelu_tanh", "relu", "silu"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


def need(backend):
    if backend == "cpu" and not _ext.has_op("bsr_ffn", "cpu"):
        pytest.skip("compiled CPU extension (with bsr_ffn) not built (make build)")
    if backend == "triton" and not (triton_available() and triton_interpret()):
        pytest.skip("Triton on CPU needs triton and TRITON_INTERPRET=1")


def weights(density, dtype, empty=False):
    m1 = random_block_mask((HIDDEN // B1[0], K // B1[1]), density)
    m2 = random_block_mask((N // B2[0], HIDDEN // B2[1]), density)
    if empty:
        m1[0] = False  # an intermediate block of act(b1) only
        m2[:, 0] = False  # intermediate columns W2 never reads
    w1 = BlockSparseTensor.from_dense(torch.randn(HIDDEN, K, dtype=torch.float64) / K ** 0.5, B1, m1)
    w2 = BlockSparseTensor.from_dense(torch.randn(N, HIDDEN, dtype=torch.float64) / HIDDEN ** 0.5,
                                      B2, m2)
    return w1.to(dtype), w2.to(dtype)


def act64(h, activation):
    return {"none": h, "gelu": F.gelu(h), "gelu_tanh": F.gelu(h, approximate="tanh"),
            "relu": F.relu(h), "silu": F.silu(h)}[activation]


def composed(x, w1, b1, w2, b2, activation, dtype):
    """The unfused FFN in `dtype` (float64: the reference)."""
    cast = lambda t: None if t is None else t.to(dtype)
    h = F.linear(x.to(dtype), w1.to_dense().to(dtype), cast(b1))
    return F.linear(act64(h, activation), w2.to_dense().to(dtype), cast(b2))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", [(1,), (3,), (30,), (4, 97)], ids=["T1", "T3", "T30", "3d"])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("activation", ACTS)
def test_forward_matches_reference(backend, dtype, tokens, density, activation):
    need(backend)
    dtype = DTYPES[dtype]
    w1, w2 = weights(density, dtype, empty=density == 0.5)
    x = torch.randn(*tokens, K, dtype=dtype)
    b1, b2 = torch.randn(HIDDEN, dtype=dtype), torch.randn(N, dtype=dtype)
    y = sparse_ffn(x, w1, b1, w2, b2, activation, backend=backend)
    assert y.dtype == dtype and y.shape == (*tokens, N)
    ref = composed(x, w1, b1, w2, b2, activation, torch.float64)
    base = None if dtype == torch.float64 else composed(x, w1, b1, w2, b2, activation, dtype)
    assert_close_to_reference(y, ref, base, reduction=K + HIDDEN)


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("activation", ACTS)
def test_triton_forward_matches_reference(density, activation):
    """The Triton route (FFN1 with bias + activation in its epilogue, then FFN2) in the
    interpreter: one small fp32 shape (tests/ops/test_bsr_linear_triton.py covers dtypes)."""
    need("triton")
    w1, w2 = weights(density, torch.float32, empty=density == 0.5)
    x = torch.randn(2, 15, K)
    b1, b2 = torch.randn(HIDDEN), torch.randn(N)
    y = sparse_ffn(x, w1, b1, w2, b2, activation, backend="triton")
    args = (x, w1, b1, w2, b2, activation)
    assert_close_to_reference(y, composed(*args, torch.float64), composed(*args, torch.float32),
                              reduction=K + HIDDEN)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradients_match_reference(backend, activation, with_bias):
    need(backend)
    w1, w2 = weights(0.5, torch.float32, empty=True)
    v1 = w1.values.clone().requires_grad_()
    v2 = w2.values.clone().requires_grad_()
    b1 = torch.randn(HIDDEN, requires_grad=True) if with_bias else None
    x = torch.randn(3, 41, K, requires_grad=True)
    if activation == "relu":
        W1_64 = w1.to_dense().double()
        x = off_the_kink(lambda: torch.randn(3, 41, K, requires_grad=True),
                         lambda x64: F.linear(x64, W1_64, None if b1 is None else b1.double()), K)
    b2 = torch.randn(N, requires_grad=True) if with_bias else None
    inputs = [x, v1, v2] + ([b1, b2] if with_bias else [])
    y = torch.ops.sparsekernels.bsr_ffn(
        x, v1, *(getattr(w1, n) for n in ("crow_indices", "col_indices", "row_indices",
                                           "ccol_indices", "row_indices_t", "transpose_perm")),
        b1, v2, *(getattr(w2, n) for n in ("crow_indices", "col_indices", "row_indices",
                                            "ccol_indices", "row_indices_t", "transpose_perm")),
        b2, activation, backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, g)

    # float64 reference through dense autograd on the same stored blocks
    from sparsekernels.ops.reference.bsr_linear import bsr_to_dense

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    x64, v164, v264 = leaves[:3]
    b164, b264 = leaves[3:] if with_bias else (None, None)
    W1 = bsr_to_dense(v164, w1.row_indices, w1.col_indices, (HIDDEN, K))
    W2 = bsr_to_dense(v264, w2.row_indices, w2.col_indices, (N, HIDDEN))
    ref = F.linear(act64(F.linear(x64, W1, b164), activation), W2, b264)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    names = ["x", "values1", "values2", "bias1", "bias2"]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close_to_reference(got, want, reduction=x.shape[0] * x.shape[1] + HIDDEN,
                                  factor=8.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    need(backend)
    w1, w2 = weights(0.5, torch.float32)
    idx = lambda w: [getattr(w, n) for n in ("crow_indices", "col_indices", "row_indices",
                                              "ccol_indices", "row_indices_t", "transpose_perm")]
    args = (torch.randn(30, K, requires_grad=True), w1.values.clone().requires_grad_(), *idx(w1),
            torch.randn(HIDDEN, requires_grad=True), w2.values.clone().requires_grad_(), *idx(w2),
            torch.randn(N, requires_grad=True), "gelu", backend)
    torch.library.opcheck(torch.ops.sparsekernels.bsr_ffn.default, args)


def _packed_args(w1, b1, w2, b2):
    from sparsekernels.ops.bsr_linear import pack

    return (w1.values, pack(w1.values), w1.crow_indices, w1.col_indices, b1,
            w2.values, pack(w2.values), w2.crow_indices, w2.col_indices, b2)


@pytest.mark.parametrize("dtype", ["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("tokens", [1, 2, 11, 47, 48, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_packed_matches_reference(dtype, tokens, activation):
    """bsr_ffn_packed around the register tiles and the schedules' switch (below 2 threads x
    24 rows the threads split the hidden units, from there on whole rows)."""
    need("cpu")
    dtype = DTYPES[dtype]
    w1, w2 = weights(0.5, dtype, empty=True)
    x = torch.randn(tokens, K, dtype=dtype)
    b1, b2 = torch.randn(HIDDEN, dtype=dtype), torch.randn(N, dtype=dtype)
    y = torch.ops.sparsekernels.bsr_ffn_packed(x, *_packed_args(w1, b1, w2, b2), activation)
    args = (x, w1, b1, w2, b2, activation)
    base = None if dtype == torch.float64 else composed(*args, dtype)
    assert_close_to_reference(y, composed(*args, torch.float64), base, reduction=K + HIDDEN)


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("tokens", [1, 5, 30, 97], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("packed", [False, True], ids=["stored", "packed"])
def test_fused_rounds_as_two_bsr_linear_calls(dtype, tokens, packed):
    """Both schedules run bsr_linear's own products per layer (the same few-row rule), so
    with an exactly rounded activation fused == bsr_linear -> relu -> bsr_linear, bit for bit."""
    need("cpu")
    from sparsekernels.ops.bsr_linear import pack

    dtype = DTYPES[dtype]
    w1, w2 = weights(0.5, dtype, empty=True)
    x = torch.randn(tokens, K, dtype=dtype)
    b1, b2 = torch.randn(HIDDEN, dtype=dtype), torch.randn(N, dtype=dtype)
    lin = _ext.op("bsr_linear", "cpu")
    p = (lambda w: pack(w.values)) if packed else (lambda w: None)
    h = F.relu(lin(x, w1.values, w1.crow_indices, w1.col_indices, b1, p(w1)))
    want = lin(h, w2.values, w2.crow_indices, w2.col_indices, b2, p(w2))
    if packed:
        got = torch.ops.sparsekernels.bsr_ffn_packed(x, *_packed_args(w1, b1, w2, b2), "relu")
    else:
        got = sparse_ffn(x, w1, b1, w2, b2, "relu", backend="cpu")
    assert torch.equal(got, want)


def test_auto_composes_when_a_layer_is_too_dense(monkeypatch):
    """auto: a weight above the crossover runs its layer dense, so no fused call is made;
    with both weights below it, the fused op runs."""
    x = torch.randn(30, K)
    calls = []
    real = torch.ops.sparsekernels.bsr_ffn
    monkeypatch.setattr(torch.ops.sparsekernels, "bsr_ffn",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    monkeypatch.setenv("SPARSEKERNELS_DENSE_CROSSOVER", "0.9")
    dense_w1, sparse_w2 = weights(1.0, torch.float32)[0], weights(0.5, torch.float32)[1]
    y = sparse_ffn(x, dense_w1, None, sparse_w2, None, "relu")
    assert calls == []
    args = (x, dense_w1, None, sparse_w2, None, "relu")
    assert_close_to_reference(y, composed(*args, torch.float64), composed(*args, torch.float32),
                              reduction=K + HIDDEN)
    w1, w2 = weights(0.5, torch.float32)
    sparse_ffn(x, w1, None, w2, None, "relu")
    assert calls == [1]


def test_bad_input_is_refused_with_the_fix():
    w1, w2 = weights(0.5, torch.float32)
    x = torch.randn(4, K)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        sparse_ffn(x, w1, None, w2, None, "swish")
    with pytest.raises(ValueError, match="w2 reads 192 features but w1 produces 192|second layer"):
        sparse_ffn(x, w1, None, w1, None)
    with pytest.raises(TypeError, match="BlockSparseTensor"):
        sparse_ffn(x, w1, None, w2.to_dense(), None)
    with pytest.raises(TypeError, match="dtype mismatch"):
        sparse_ffn(x, w1, None, w2.double(), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse_ffn(x, w1, None, w2, torch.randn(N + 1))
    with pytest.raises(ValueError, match="wrong input width"):
        sparse_ffn(torch.randn(4, K + 16), w1, None, w2, None)


# --- GPU (make test-gpu) ---------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gpu_bert_ffn(backend, dtype, activation):
    """A BERT-base FFN (768 -> 3072 -> 768, 32x32 blocks, density 0.3), forward and the
    recomputing backward, on the GPU backends."""
    from sparsekernels.ops.backend import Backend, available

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = available(Backend(backend), torch.device("cuda"), "bsr_linear")
    if reason is not None:
        pytest.skip(reason)
    masks = [random_block_mask(g, 0.3) for g in ((96, 24), (24, 96))]
    w1 = BlockSparseTensor.from_dense(torch.randn(3072, 768) / 768 ** 0.5, (32, 32), masks[0])
    w2 = BlockSparseTensor.from_dense(torch.randn(768, 3072) / 3072 ** 0.5, (32, 32), masks[1])
    w1, w2 = w1.to("cuda").to(dtype), w2.to("cuda").to(dtype)
    x = torch.randn(2, 257, 768, device="cuda", dtype=dtype, requires_grad=True)
    b1 = torch.randn(3072, device="cuda", dtype=dtype)
    b2 = torch.randn(768, device="cuda", dtype=dtype)
    y = sparse_ffn(x, w1, b1, w2, b2, activation, backend=backend)
    args = (x.detach(), w1, b1, w2, b2, activation)
    assert_close_to_reference(y, composed(*args, torch.float64), composed(*args, dtype),
                              reduction=768 + 3072)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    ref = composed(x64, w1, b1, w2, b2, activation, torch.float64)
    (gx64,) = torch.autograd.grad(ref, x64, g.double())
    xd = x.detach().requires_grad_()
    (gxd,) = torch.autograd.grad(composed(xd, w1, b1, w2, b2, activation, dtype), xd, g)
    assert_close_to_reference(gx, gx64, gxd, reduction=768 + 3072, name="grad x")
