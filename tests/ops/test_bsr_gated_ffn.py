"""sparsekernels::bsr_gated_ffn (the gated block-sparse FFN) on every CPU-runnable backend
against a float64 reference, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from sparsekernels import BlockSparseTensor
from sparsekernels.formats.functional import sparse_gated_ffn
from sparsekernels.ops import _ext
from sparsekernels.ops.backend import triton_available, triton_interpret
from sparsekernels.ops.bsr_linear import pack
from sparsekernels.ops.reference.bsr_linear import bsr_to_dense
from sparsekernels.testing import assert_close_to_reference, off_the_kink, random_block_mask

K, HIDDEN, N = 96, 192, 64  # gate / up [HIDDEN, K] in 32x16 blocks, down [N, HIDDEN] in 16x64
BGU, BD = (32, 16), (16, 64)
ACTS = ["silu", "gelu_tanh", "gelu", "relu", "none"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
INDEX = ("crow_indices", "col_indices", "row_indices", "ccol_indices", "row_indices_t",
         "transpose_perm")


def need(backend):
    if backend == "cpu" and not _ext.has_op("bsr_gated_ffn", "cpu"):
        pytest.skip("compiled CPU extension (with bsr_gated_ffn) not built (make build)")
    if backend == "triton" and not (triton_available() and triton_interpret()):
        pytest.skip("Triton on CPU needs triton and TRITON_INTERPRET=1")


def weights(density, dtype, empty=False, k=K, hidden=HIDDEN, n=N, bgu=BGU, bd=BD):
    masks = [random_block_mask((hidden // bgu[0], k // bgu[1]), density) for _ in range(2)]
    md = random_block_mask((n // bd[0], hidden // bd[1]), density)
    if empty:
        masks[0][0] = False  # a gate block row of act(b_g) only
        masks[1][1] = False  # an up block row of b_u only
        md[:, 0] = False  # intermediate columns down never reads
        md[-1] = False  # an output block row of b_d only
    gate, up = (BlockSparseTensor.from_dense(torch.randn(hidden, k, dtype=torch.float64) / k ** 0.5,
                                             bgu, m) for m in masks)
    down = BlockSparseTensor.from_dense(torch.randn(n, hidden, dtype=torch.float64) / hidden ** 0.5,
                                        bd, md)
    return gate.to(dtype), up.to(dtype), down.to(dtype)


def biases(dtype, which=(True, True, True), hidden=HIDDEN, n=N):
    sizes = (hidden, hidden, n)
    return [torch.randn(s, dtype=dtype) if w else None for s, w in zip(sizes, which)]


def act(h, activation):
    return {"none": h, "gelu": F.gelu(h), "gelu_tanh": F.gelu(h, approximate="tanh"),
            "relu": F.relu(h), "silu": F.silu(h)}[activation]


def composed(x, gate, up, down, bg, bu, bd, activation, dtype):
    """The unfused gated FFN in `dtype` with dense torch ops (float64: the reference)."""
    cast = lambda t: None if t is None else t.to(dtype)
    x = x.to(dtype)
    h = act(F.linear(x, gate.to_dense().to(dtype), cast(bg)), activation) * F.linear(
        x, up.to_dense().to(dtype), cast(bu))
    return F.linear(h, down.to_dense().to(dtype), cast(bd))


def op_args(x, gate, up, down, bg, bu, bd, activation, backend, values=None):
    vg, vu, vd = values or (gate.values, up.values, down.values)
    return (x, vg, *(getattr(gate, n) for n in INDEX), bg, vu, *(getattr(up, n) for n in INDEX),
            bu, vd, *(getattr(down, n) for n in INDEX), bd, activation, backend)


TOKENS = [(1,), (3,), (97,), (2, 15)]
TOKEN_IDS = ["T1", "T3", "T97", "3d"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", TOKENS, ids=TOKEN_IDS)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("activation", ACTS)
def test_forward_matches_reference(backend, dtype, tokens, density, activation):
    need(backend)
    dtype = DTYPES[dtype]
    gate, up, down = weights(density, dtype, empty=density == 0.5)
    x = torch.randn(*tokens, K, dtype=dtype)
    bs = biases(dtype)
    y = sparse_gated_ffn(x, gate, up, down, *bs, activation=activation, backend=backend)
    assert y.dtype == dtype and y.shape == (*tokens, N)
    ref = composed(x, gate, up, down, *bs, activation, torch.float64)
    base = None if dtype == torch.float64 else composed(x, gate, up, down, *bs, activation, dtype)
    assert_close_to_reference(y, ref, base, reduction=K + HIDDEN)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("which", [(False, False, False), (True, False, True),
                                   (False, True, False)], ids=["nobias", "gate+down", "up"])
@pytest.mark.parametrize("tokens", [1, 40], ids=lambda t: f"T{t}")
def test_optional_biases(backend, which, tokens):
    need(backend)
    gate, up, down = weights(0.5, torch.float32, empty=True)
    x = torch.randn(tokens, K)
    bs = biases(torch.float32, which)
    y = sparse_gated_ffn(x, gate, up, down, *bs, backend=backend)
    assert_close_to_reference(y, composed(x, gate, up, down, *bs, "silu", torch.float64),
                              composed(x, gate, up, down, *bs, "silu", torch.float32),
                              reduction=K + HIDDEN)


@pytest.mark.parametrize("tokens", [(1,), (3,), (2, 15)], ids=["T1", "T3", "3d"])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("activation", ACTS)
def test_triton_forward_matches_reference(tokens, density, activation):
    """The Triton route (gate and up in one kernel, act(gate) * up in its epilogue, then
    down) in the interpreter, fp32."""
    need("triton")
    gate, up, down = weights(density, torch.float32, empty=density == 0.5)
    x = torch.randn(*tokens, K)
    bs = biases(torch.float32, (True, density != 0.5, True))  # 0.5: up without a bias
    y = sparse_gated_ffn(x, gate, up, down, *bs, activation=activation, backend="triton")
    args = (x, gate, up, down, *bs, activation)
    assert_close_to_reference(y, composed(*args, torch.float64), composed(*args, torch.float32),
                              reduction=K + HIDDEN)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_dtypes(dtype):
    need("triton")
    dtype = DTYPES[dtype]
    gate, up, down = weights(0.5, dtype, empty=True)
    x = torch.randn(5, K, dtype=dtype)
    bs = biases(dtype)
    y = sparse_gated_ffn(x, gate, up, down, *bs, activation="silu", backend="triton")
    args = (x, gate, up, down, *bs, "silu")
    assert_close_to_reference(y, composed(*args, torch.float64), composed(*args, dtype),
                              reduction=K + HIDDEN)


def _grads_vs_reference(backend, activation, which, tokens, dtype=torch.float32):
    gate, up, down = weights(0.5, dtype, empty=True)
    values = [w.values.clone().requires_grad_() for w in (gate, up, down)]
    bs = [b.requires_grad_() if b is not None else None for b in biases(dtype, which)]
    x = torch.randn(*tokens, K, dtype=dtype, requires_grad=True)
    if activation == "relu":
        Wg64, bg64 = gate.to_dense().double(), None if bs[0] is None else bs[0].double()
        x = off_the_kink(lambda: torch.randn(*tokens, K, dtype=dtype, requires_grad=True),
                         lambda x64: F.linear(x64, Wg64, bg64), K)
    y = torch.ops.sparsekernels.bsr_gated_ffn(
        *op_args(x, gate, up, down, *bs, activation, backend, values))
    inputs = [x, *values] + [b for b in bs if b is not None]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, g)

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    x64, vg, vu, vd = leaves[:4]
    b64 = iter(leaves[4:])
    bg, bu, bd = (next(b64) if w else None for w in which)
    Wg = bsr_to_dense(vg, gate.row_indices, gate.col_indices, (HIDDEN, K))
    Wu = bsr_to_dense(vu, up.row_indices, up.col_indices, (HIDDEN, K))
    Wd = bsr_to_dense(vd, down.row_indices, down.col_indices, (N, HIDDEN))
    ref = F.linear(act(F.linear(x64, Wg, bg), activation) * F.linear(x64, Wu, bu), Wd, bd)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    names = ["x", "gate", "up", "down"] + [n for n, w in zip(("b_g", "b_u", "b_d"), which) if w]
    rows = x.numel() // K
    for name, got, want in zip(names, grads, ref_grads):
        assert got.dtype == dtype
        assert_close_to_reference(got, want, reduction=rows + HIDDEN, factor=8.0,
                                  name=f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("tokens", [(1,), (3, 41)], ids=["T1", "3d"])
def test_gradients_match_reference(backend, activation, tokens):
    need(backend)
    _grads_vs_reference(backend, activation, (True, True, True), tokens)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("which", [(False, False, False), (False, True, False)],
                         ids=["nobias", "up"])
def test_gradients_with_missing_biases(backend, which):
    need(backend)
    _grads_vs_reference(backend, "silu", which, (97,))


@pytest.mark.parametrize("dtype", ["fp64", "bf16"])
def test_gradients_in_other_dtypes(dtype):
    need("cpu")
    _grads_vs_reference("cpu", "gelu_tanh", (True, True, True), (33,), DTYPES[dtype])


def test_triton_gradients_match_reference():
    need("triton")
    _grads_vs_reference("triton", "silu", (True, False, True), (7,))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("tokens", [1, 30], ids=lambda t: f"T{t}")
def test_opcheck(backend, tokens):
    need(backend)
    gate, up, down = weights(0.5, torch.float32)
    values = [w.values.clone().requires_grad_() for w in (gate, up, down)]
    bs = [b.requires_grad_() for b in biases(torch.float32)]
    args = op_args(torch.randn(tokens, K, requires_grad=True), gate, up, down, *bs, "silu",
                   backend, values)
    torch.library.opcheck(torch.ops.sparsekernels.bsr_gated_ffn.default, args)


@pytest.mark.parametrize("tokens", [1, 30], ids=lambda t: f"T{t}")
def test_opcheck_packed(tokens):
    need("cpu")
    gate, up, down = weights(0.5, torch.float32)
    bs = biases(torch.float32, (True, False, True))
    args = (torch.randn(tokens, K), *(t for w, b in zip((gate, up, down), bs)
                                      for t in (w.values, pack(w.values), w.crow_indices,
                                                w.col_indices, b)), "gelu_tanh")
    torch.library.opcheck(torch.ops.sparsekernels.bsr_gated_ffn_packed.default, args)


# --- the CPU kernel: packed blocks, schedules, exactness ------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("tokens", [1, 3, 12, 23, 24, 97], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_packed_matches_reference(dtype, tokens, activation):
    """bsr_gated_ffn_packed at the row counts around the schedules' switch (23 / 24 rows
    split the hidden units, then each thread takes whole rows) and the register tiles."""
    need("cpu")
    dtype = DTYPES[dtype]
    gate, up, down = weights(0.5, dtype, empty=True)
    x = torch.randn(tokens, K, dtype=dtype)
    bs = biases(dtype)
    y = torch.ops.sparsekernels.bsr_gated_ffn_packed(
        x, *(t for w, b in zip((gate, up, down), bs)
             for t in (w.values, pack(w.values), w.crow_indices, w.col_indices, b)), activation)
    args = (x, gate, up, down, *bs, activation)
    base = None if dtype == torch.float64 else composed(*args, dtype)
    assert_close_to_reference(y, composed(*args, torch.float64), base, reduction=K + HIDDEN)


def _linear(x, w, b, packed):
    return _ext.op("bsr_linear", "cpu")(x, w.values, w.crow_indices, w.col_indices, b,
                                        pack(w.values) if packed else None)


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("tokens", [1, 5, 30, 97], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("packed", [False, True], ids=["stored", "packed"])
@pytest.mark.parametrize("activation", ["relu", "none"])  # exact elementwise ops
def test_fused_rounds_as_three_bsr_linear_calls(dtype, tokens, packed, activation):
    """Both schedules run bsr_linear's own products, so with an exactly rounded activation
    the fused result equals gate -> act -> * up -> down through the CPU bsr_linear bit for
    bit (with or without packed blocks: each layer takes the same path as bsr_linear)."""
    need("cpu")
    dtype = DTYPES[dtype]
    gate, up, down = weights(0.5, dtype, empty=True)
    x = torch.randn(tokens, K, dtype=dtype)
    bg, bu, bd = biases(dtype)
    h = act(_linear(x, gate, bg, packed), activation) * _linear(x, up, bu, packed)
    want = _linear(h, down, bd, packed)
    if packed:
        got = torch.ops.sparsekernels.bsr_gated_ffn_packed(
            x, *(t for w, b in zip((gate, up, down), (bg, bu, bd))
                 for t in (w.values, pack(w.values), w.crow_indices, w.col_indices, b)),
            activation)
    else:
        got = torch.ops.sparsekernels.bsr_gated_ffn(
            *op_args(x, gate, up, down, bg, bu, bd, activation, "cpu"))
    assert torch.equal(got, want)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(threads):
    """The schedules split units and rows over any number of threads, more than rows too."""
    need("cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gate, up, down = weights(0.3, torch.float32, empty=True)
        for tokens in (1, 2, 50):
            x = torch.randn(tokens, K)
            bs = biases(torch.float32)
            y = sparse_gated_ffn(x, gate, up, down, *bs, backend="cpu")
            assert_close_to_reference(y, composed(x, gate, up, down, *bs, "silu", torch.float64),
                                      composed(x, gate, up, down, *bs, "silu", torch.float32),
                                      reduction=K + HIDDEN)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("blocks", [((16, 16), (16, 16)), ((64, 32), (128, 64)),
                                    ((128, 128), (32, 128))], ids=lambda b: f"{b[0]}-{b[1]}")
@pytest.mark.parametrize("tokens", [1, 7, 60], ids=lambda t: f"T{t}")
def test_block_sizes(blocks, tokens):
    need("cpu")
    bgu, bd = blocks
    k, hidden, n = 256, 512, 128
    gate, up, down = weights(0.4, torch.float32, True, k, hidden, n, bgu, bd)
    x = torch.randn(tokens, k)
    bs = biases(torch.float32, hidden=hidden, n=n)
    y = sparse_gated_ffn(x, gate, up, down, *bs, backend="cpu")
    args = (x, gate, up, down, *bs, "silu")
    assert_close_to_reference(y, composed(*args, torch.float64), composed(*args, torch.float32),
                              reduction=k + hidden)


# --- the public wrapper ---------------------------------------------------------------------
def test_auto_composes_when_a_layer_is_too_dense(monkeypatch):
    """auto: a weight above the crossover runs its layer dense, so no fused call is made."""
    calls = []
    real = torch.ops.sparsekernels.bsr_gated_ffn
    monkeypatch.setattr(torch.ops.sparsekernels, "bsr_gated_ffn",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    monkeypatch.setenv("SPARSEKERNELS_DENSE_CROSSOVER", "0.9")
    x = torch.randn(6, K)
    gate = weights(1.0, torch.float32)[0]
    _, up, down = weights(0.5, torch.float32)
    y = sparse_gated_ffn(x, gate, up, down)
    assert calls == []
    args = (x, gate, up, down, None, None, None, "silu")
    assert_close_to_reference(y, composed(*args, torch.float64), composed(*args, torch.float32),
                              reduction=K + HIDDEN)
    gate, up, down = weights(0.5, torch.float32)
    sparse_gated_ffn(x, gate, up, down)
    assert calls == ([1] if _ext.has_op("bsr_linear", "cpu") else [])


def test_bad_input_is_refused_with_the_fix():
    gate, up, down = weights(0.5, torch.float32)
    x = torch.randn(4, K)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        sparse_gated_ffn(x, gate, up, down, activation="swish")
    with pytest.raises(ValueError, match="one shape and one block size"):
        sparse_gated_ffn(x, gate, BlockSparseTensor.from_dense(up.to_dense(), (16, 16)), down)
    with pytest.raises(ValueError, match="down reads 96 features"):
        sparse_gated_ffn(x, gate, up, BlockSparseTensor.from_dense(torch.randn(N, K), (16, 16)))
    with pytest.raises(TypeError, match="BlockSparseTensor"):
        sparse_gated_ffn(x, gate, up, down.to_dense())
    with pytest.raises(TypeError, match="dtype mismatch"):
        sparse_gated_ffn(x, gate, up.double(), down)
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse_gated_ffn(x, gate, up, down, up_bias=torch.randn(HIDDEN + 1))
    with pytest.raises(ValueError, match="wrong input width"):
        sparse_gated_ffn(torch.randn(4, K + 16), gate, up, down)


def test_the_kernel_refuses_mismatched_layers():
    need("cpu")
    gate, up, down = weights(0.5, torch.float32)
    other = BlockSparseTensor.from_dense(torch.randn(HIDDEN, K), (16, 16))
    op = _ext.op("bsr_gated_ffn", "cpu")
    x = torch.randn(4, K)
    layer = lambda w: (w.values, w.crow_indices, w.col_indices, None)
    with pytest.raises(RuntimeError, match="gate and up must have the same shape"):
        op(x, *layer(gate), *layer(other), *layer(down), "silu")
    with pytest.raises(RuntimeError, match="blocks but"):
        op(x, gate.values[1:], gate.crow_indices, gate.col_indices, None, *layer(up),
           *layer(down), "silu")
    with pytest.raises(RuntimeError, match="packed must be values.transpose"):
        op(x, *layer(gate), *layer(up), *layer(down), "silu", torch.zeros(1, 16, 32))


# --- GPU (make test-gpu) ---------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 16, 257], ids=lambda t: f"T{t}")
def test_gpu_smollm2_mlp(backend, dtype, tokens):
    """A SmolLM2-135M MLP (576 -> 1536 gate / up, 1536 -> 576 down, 32x32 blocks, density
    0.3), forward and the recomputing backward, on the GPU backends."""
    from sparsekernels.ops.backend import Backend, available

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = available(Backend(backend), torch.device("cuda"), "bsr_linear")
    if reason is not None:
        pytest.skip(reason)
    gate, up, down = (w.to("cuda") for w in weights(0.3, dtype, False, 576, 1536, 576,
                                                      (32, 32), (32, 32)))
    x = torch.randn(tokens, 576, device="cuda", dtype=dtype, requires_grad=True)
    y = sparse_gated_ffn(x, gate, up, down, activation="silu", backend=backend)
    args = (x.detach(), gate, up, down, None, None, None, "silu")
    assert_close_to_reference(y, composed(*args, torch.float64), composed(*args, dtype),
                              reduction=576 + 1536)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(composed(x64, *args[1:], torch.float64), x64, g.double())
    xd = x.detach().requires_grad_()
    (gxd,) = torch.autograd.grad(composed(xd, *args[1:], dtype), xd, g)
    assert_close_to_reference(gx, gx64, gxd, reduction=576 + 1536, name="grad x")
