"""sparsekernels::block_sparse_attention (forward, backward op, autograd) on every backend that
can run here, against the float64 reference.

Triton cases run on CPU tensors in the interpreter (TRITON_INTERPRET=1, set by `make test`)
and are skipped without it; `cpu` cases need the compiled extension; `gpu` cases run the
Triton and CUDA backends on a CUDA device. Shapes stay tiny: the interpreter runs one
program at a time.

Accuracy rule (STYLE.md): the kernel's max error against float64 is at most twice the error
of the same computation done by torch (the reference) in the kernel's dtype.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from sparsekernels.ops import _ext
from sparsekernels.ops.backend import triton_available, triton_interpret
from sparsekernels.ops.block_sparse_attention import block_sparse_attention
from sparsekernels.ops.reference import block_sparse_attention as ref
from sparsekernels.testing import assert_close_to_reference

OP = "block_sparse_attention"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
DENSITIES = {"d0": 0.0, "d0.1": 0.1, "d0.5": 0.5, "d1": 1.0}


def _op_module():
    return importlib.import_module("sparsekernels.ops.block_sparse_attention")


def need(backend: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
    """Skip (at run time) what this machine cannot run."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "cpu":
        if not _ext.has_op(OP, "cpu"):
            pytest.skip("compiled CPU extension without block_sparse_attention (make build)")
    if backend == "cuda" and not _ext.has_op(OP, "cuda"):
        pytest.skip("extension built without the CUDA kernel")
    if backend == "triton":
        if not triton_available():
            pytest.skip("triton is not installed")
        if device == "cpu":
            if not triton_interpret():
                pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
            if dtype in (torch.bfloat16, torch.float64):
                pytest.skip("the Triton interpreter miscomputes bf16 tl.dot (GPU cases cover it)")


def random_layout(heads, nq, nk, density, batch=None) -> torch.Tensor:
    """Exactly round(density * n) true blocks per head (per batch element when batch)."""
    lead = (heads,) if batch is None else (batch, heads)
    n = nq * nk
    keep = round(density * n)
    scores = torch.rand(*lead, n)
    flat = torch.zeros(*lead, n, dtype=torch.bool)
    flat.scatter_(-1, scores.argsort(-1)[..., :keep], True)
    return flat.view(*lead, nq, nk)


def make_qkv(b, h, lq, lk, d, dtype, device="cpu", requires_grad=False, kv_heads=None):
    """q [b, h, lq, d]; k, v [b, kv_heads (default h), lk, d]."""
    hkv = h if kv_heads is None else kv_heads
    ts = [torch.randn(b, n_heads, n, d, dtype=torch.float64, device=device)
          for n_heads, n in ((h, lq), (hkv, lk), (hkv, lk))]
    return [t.to(dtype).requires_grad_(requires_grad) for t in ts]


def expected(q, k, v, layout, block_size, mask=None, causal=False, grad=None, window=0):
    """(float64 truth, torch's own result in q's dtype) for outputs and, given grad, grads."""
    def run(dtype):
        qs, ks, vs = (t.detach().to(dtype) for t in (q, k, v))
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
        out, _ = ref.block_sparse_attention(qs, ks, vs, layout, block_size, m, causal,
                                            1.0 / math.sqrt(q.shape[-1]), window=window)
        if grad is None:
            return out, None
        # the baseline forms rowsum(P * dP) from the rounded output, as the kernels do
        grads = ref.block_sparse_attention_backward(grad.to(dtype), qs, ks, vs, layout,
                                                    block_size, m, causal,
                                                    1.0 / math.sqrt(q.shape[-1]), out=out,
                                                    window=window)
        return out, grads
    return run(torch.float64), run(q.dtype)


# Gradients get twice the forward's slack: the torch baseline forms rowsum(dO * O) from the
# rounded output like the kernels (FlashAttention-2), but the kernels also recompute P from
# stored statistics and sum dQ / dK / dV block by block.
GRAD_FACTOR = 4.0


# The forward's slack: "about twice" torch's error; the online softmax rescales the partial
# output once per visited key block and normalises at the end (seen up to ~2.3x on random
# inputs, never more than 3x).
OUT_FACTOR = 3.0


def check(out, grads, truth, base, names=("out", "dq", "dk", "dv"), grad_reduction=1,
          out_reduction=1):
    """out_reduction: the floor of the forward's bound is the rounding of a sum of this many
    terms; decode passes the cache length, as one query row's max error is taken over only D
    outputs, where torch's own error is often a single ulp."""
    # in float64 the truth is the same dtype: torch's "own error" is 0, allow a few ulps
    f = 4.0 if out.dtype == torch.float64 else 1.0
    assert_close_to_reference(out, truth[0], base[0], factor=OUT_FACTOR * f, name=names[0],
                              reduction=out_reduction)
    if grads is not None:
        for g, t, bl, name in zip(grads, truth[1], base[1], names[1:]):
            assert_close_to_reference(g, t, bl, factor=GRAD_FACTOR * f, name=name,
                                      reduction=grad_reduction)


# --- the reference itself -------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_all_true_equals_sdpa(causal):
    q, k, v = make_qkv(2, 3, 70, 70, 32, torch.float64)
    mask = torch.rand(2, 1, 1, 70) > 0.2
    mask[..., 0] = True
    layout = torch.ones(3, 3, 5, dtype=torch.bool)
    out, _ = ref.block_sparse_attention(q, k, v, layout, (32, 16), mask, causal, 32 ** -0.5)
    sdpa_mask = mask & torch.ones(70, 70, dtype=torch.bool).tril() if causal else mask
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


def test_reference_backward_matches_autograd():
    q, k, v = make_qkv(1, 2, 40, 50, 16, torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 40, 50, dtype=torch.float64, requires_grad=True)
    layout = random_layout(2, 3, 4, 0.5)
    layout[0, 1] = False  # empty rows
    out, _ = ref.block_sparse_attention(q, k, v, layout, (16, 16), bias, True, 0.3)
    g = torch.randn_like(out)
    auto = torch.autograd.grad(out, (q, k, v, bias), g)
    mine = ref.block_sparse_attention_backward(g, q.detach(), k.detach(), v.detach(), layout,
                                               (16, 16), bias.detach(), True, 0.3)
    for a, m in zip(auto, mine):
        torch.testing.assert_close(m, a, rtol=1e-10, atol=1e-10)


# --- forward and backward on every backend ---------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("density", list(DENSITIES.values()), ids=list(DENSITIES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_backward_random_layouts(backend, density, causal):
    need(backend)
    b, h, lq, lk, d, bs = 2, 2, 97, 97, 32, (32, 32)
    q, k, v = make_qkv(b, h, lq, lk, d, torch.float32, requires_grad=True)
    layout = random_layout(h, 4, 4, density)
    out = block_sparse_attention(q, k, v, layout, bs, causal=causal, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, bs, None, causal, g)
    check(out, (q.grad, k.grad, v.grad), truth, base)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
def test_dtypes(backend, dtype):
    dtype = DTYPES[dtype]
    need(backend, dtype)
    b, h, l, d, bs = 1, 2, 64, 32, (32, 32)
    q, k, v = make_qkv(b, h, l, l, d, dtype, requires_grad=True)
    layout = random_layout(h, 2, 2, 0.5)
    out = block_sparse_attention(q, k, v, layout, bs, backend=backend)
    assert out.dtype == dtype
    # on the CPU, a view of [B, Lq, H, D] memory (SDPA's CPU layout): no copy to go back
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, bs, None, False, g)
    check(out, (q.grad, k.grad, v.grad), truth, base)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("block_size", [(16, 16), (32, 64), (64, 16)], ids=lambda b: f"b{b[0]}x{b[1]}")
def test_head_dims_block_sizes_ragged(backend, head_dim, block_size):
    need(backend)
    b, h, lq, lk = 1, 2, 70, 45  # neither is a block multiple; Lq != Lk
    bq, bk = block_size
    q, k, v = make_qkv(b, h, lq, lk, head_dim, torch.float32, requires_grad=True)
    layout = random_layout(h, -(-lq // bq), -(-lk // bk), 0.6)
    out = block_sparse_attention(q, k, v, layout, block_size, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, block_size, None, False, g)
    check(out, (q.grad, k.grad, v.grad), truth, base)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("mask_kind", ["bool-keys", "bool-full", "additive-keys", "additive-full"])
def test_padding_masks(backend, mask_kind):
    """The transformers padding mask: [B, 1, 1, Lk] or [B, 1, Lq, Lk], bool or additive."""
    need(backend)
    b, h, l, d, bs = 3, 2, 50, 32, (16, 32)
    q, k, v = make_qkv(b, h, l, l, d, torch.float32, requires_grad=True)
    lengths = torch.tensor([50, 33, 7])
    keys_ok = torch.arange(l)[None, :] < lengths[:, None]  # right padding
    shape = (b, 1, 1, l) if mask_kind.endswith("keys") else (b, 1, l, l)
    keep = keys_ok[:, None, None, :].expand(shape)
    if mask_kind.startswith("bool"):
        mask = keep.contiguous()
    else:
        mask = torch.zeros(shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    layout = random_layout(h, 4, 2, 0.7)
    out = block_sparse_attention(q, k, v, layout, bs, attn_mask=mask, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, bs, mask, False, g)
    check(out, (q.grad, k.grad, v.grad), truth, base)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_per_batch_layout_and_causal_padding(backend):
    need(backend)
    b, h, l, d, bs = 2, 2, 40, 32, (16, 16)
    q, k, v = make_qkv(b, h, l, l, d, torch.float32, requires_grad=True)
    layout = random_layout(h, 3, 3, 0.5, batch=b)
    mask = torch.ones(b, 1, 1, l, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding
    out = block_sparse_attention(q, k, v, layout, bs, attn_mask=mask, causal=True,
                                 backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, bs, mask, True, g)
    check(out, (q.grad, k.grad, v.grad), truth, base)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_rows_and_pruned_heads_give_zeros(backend):
    need(backend)
    b, h, l, d, bs = 1, 3, 64, 32, (32, 32)
    q, k, v = make_qkv(b, h, l, l, d, torch.float32, requires_grad=True)
    layout = torch.ones(h, 2, 2, dtype=torch.bool)
    layout[1] = False  # a pruned head
    layout[2, 0] = False  # an empty block row
    out = block_sparse_attention(q, k, v, layout, bs, backend=backend)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all()
    assert (out[:, 1] == 0).all() and (out[:, 2, :32] == 0).all()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
        assert (grad[:, 1] == 0).all()
    assert (q.grad[:, 2, :32] == 0).all()
    # rows emptied by the mask: additive -inf everywhere also gives zeros, not NaN
    mask = torch.zeros(1, 1, l, l)
    mask[..., 40:, :] = float("-inf")
    out = block_sparse_attention(q.detach(), k.detach(), v.detach(), torch.ones(h, 2, 2,
                                 dtype=torch.bool), bs, attn_mask=mask, backend=backend)
    assert torch.isfinite(out).all() and (out[..., 40:, :] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_additive_mask_gradient(backend):
    """A learned additive bias (T5's relative position bias) gets its gradient, reduced over
    the dims it was broadcast along."""
    need(backend)
    b, h, l, d, bs = 2, 2, 48, 32, (16, 16)
    q, k, v = make_qkv(b, h, l, l, d, torch.float32, requires_grad=True)
    bias = torch.randn(1, h, l, l, requires_grad=True)
    layout = random_layout(h, 3, 3, 0.6)
    out = block_sparse_attention(q, k, v, layout, bs, attn_mask=bias, causal=True,
                                 backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    b64 = bias.detach().double()
    *_, ds = ref.block_sparse_attention_backward(g.double(), q.detach().double(),
                                                  k.detach().double(), v.detach().double(),
                                                  layout, bs, b64, True, d ** -0.5)
    *_, ds32 = ref.block_sparse_attention_backward(g, q.detach(), k.detach(), v.detach(), layout,
                                                    bs, bias.detach(), True, d ** -0.5,
                                                    out=out.detach())
    assert bias.grad.shape == bias.shape
    assert_close_to_reference(bias.grad, ds.sum(0, keepdim=True), ds32.sum(0, keepdim=True),
                              factor=GRAD_FACTOR, name="dbias")


def test_triton_dropout_matches_reference_with_the_same_bits():
    need("triton")
    tb = importlib.import_module("sparsekernels.ops.triton.block_sparse_attention")
    b, h, l, d, bs, p, seed = 1, 2, 64, 32, (32, 32), 0.3, 1234
    q, k, v = make_qkv(b, h, l, l, d, torch.float32, requires_grad=True)
    layout = random_layout(h, 2, 2, 0.75)
    out, _ = torch.ops.sparsekernels.block_sparse_attention(q, k, v, layout, None, False, 0,
                                                            d ** -0.5, 32, 32, p, seed, "triton")
    g = torch.randn_like(out)
    out.backward(g)
    keep = tb.dropout_keep_mask(seed, (b, h, l, l), p, "cpu")
    assert 0.6 < keep.float().mean().item() < 0.8
    args = [t.detach().double() for t in (q, k, v)]
    r, _ = ref.block_sparse_attention(*args, layout, bs, None, False, d ** -0.5, keep, p)
    dq, dk, dv, _ = ref.block_sparse_attention_backward(g.double(), *args, layout, bs, None,
                                                        False, d ** -0.5, keep, p)
    for name, got, want in (("out", out, r), ("dq", q.grad, dq), ("dk", k.grad, dk),
                            ("dv", v.grad, dv)):
        assert_close_to_reference(got, want, None, factor=50.0, name=name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dropout_public_op(backend):
    need(backend)
    q, k, v = make_qkv(1, 2, 64, 64, 32, torch.float32, requires_grad=True)
    layout = torch.ones(2, 2, 2, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, layout, (32, 32), dropout_p=0.5, backend=backend)
    out.sum().backward()
    plain = block_sparse_attention(q, k, v, layout, (32, 32), backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert not torch.allclose(out, plain)
    # unbiased: the mean over many draws approaches the undropped output (the Triton bits are
    # checked against the reference bit for bit above; the interpreter is too slow for this)
    if backend == "reference":
        with torch.no_grad():
            mean = sum(block_sparse_attention(q, k, v, layout, (32, 32), dropout_p=0.5,
                                              backend=backend) for _ in range(64)) / 64
        assert (mean - plain).abs().mean() < 0.5 * (out.detach() - plain).abs().mean()


# --- op contracts ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", ["mha", "gqa-cache-window"])
def test_opcheck(backend, case):
    need(backend)
    # gqa-cache-window: 4 query heads on 2 key/value heads, 24 queries ending 40 keys, window 9
    h, hkv, lq, window = (2, 2, 40, 0) if case == "mha" else (4, 2, 24, 9)
    q, k, v = make_qkv(1, h, lq, 40, 32, torch.float32, requires_grad=True, kv_heads=hkv)
    layout = random_layout(h, -(-lq // 16), 3, 0.5)
    bias = torch.randn(1, 1, lq, 40, requires_grad=True)
    ops = torch.ops.sparsekernels
    torch.library.opcheck(ops.block_sparse_attention.default,
                          (q, k, v, layout, bias, True, window, 0.2, 16, 16, 0.0, 0, backend))
    out, stats = ops.block_sparse_attention(q, k, v, layout, None, False, window, 0.2, 16, 16,
                                            0.0, 0, backend)
    torch.library.opcheck(ops.block_sparse_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), stats.detach(), layout, bias.detach(), False, window,
                           0.2, 16, 16, 0.0, 0, True, backend))


def test_torch_compile_reference():
    q, k, v = make_qkv(1, 2, 32, 32, 32, torch.float32)
    layout = random_layout(2, 2, 2, 0.5)
    fn = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, layout, (16, 16),
                                                              backend="reference"),
                       backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), block_sparse_attention(q, k, v, layout, (16, 16),
                                                                   backend="reference"))


def test_block_index_is_sorted_and_padded():
    m = _op_module()
    layout = torch.tensor([[[True, False, True, False], [False, False, False, False]]])
    idx, cnt = m.block_index(layout)
    assert cnt.tolist() == [[2, 0]]
    assert idx[0, 0, :2].tolist() == [0, 2]
    eff = m.effective_layout(torch.ones(1, 3, 3, dtype=torch.bool), True, 32, 16)
    assert eff[0].tolist() == [[True, True, False], [True, True, True], [True, True, True]]


def _sdpa_from(monkeypatch, keys: int) -> None:
    """The router's measured key length for SDPA on all-true layouts, set for one test."""
    from sparsekernels.ops import router

    monkeypatch.setattr(router, "sdpa_from_keys", lambda device_type, dtype: keys)
    router.clear_cache()


@pytest.fixture
def clear_routes():
    from sparsekernels.ops import router

    yield
    router.clear_cache()  # no route computed under the patch outlives the test


def test_all_true_layouts_run_sdpa_from_the_measured_key_length(monkeypatch, clear_routes):
    monkeypatch.delenv("SPARSEKERNELS_BACKEND", raising=False)
    m = _op_module()
    _sdpa_from(monkeypatch, 64)
    q, k, v = make_qkv(1, 2, 40, 40, 32, torch.float32)
    assert not m.prefers_dense(q, k, torch.ones(2, 3, 3, dtype=torch.bool), 0.0, m.Backend.AUTO)
    q, k, v = make_qkv(1, 2, 64, 64, 32, torch.float32)
    assert m.prefers_dense(q, k, torch.ones(2, 4, 4, dtype=torch.bool), 0.0, m.Backend.AUTO)
    # the table's values as shipped are read per dtype (0 where unmeasured: always SDPA)
    from sparsekernels.ops.crossover import sdpa_from_keys

    assert sdpa_from_keys("cuda", torch.float32) == 0
    assert sdpa_from_keys("cpu", torch.float64) == 0


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_on_cpu_runs_all_true_layouts_dense(monkeypatch, clear_routes, mask_kind, causal):
    """auto's dense route (all-true layout on CPU) keeps the op's semantics: empty rows give
    zeros and finite gradients."""
    monkeypatch.delenv("SPARSEKERNELS_BACKEND", raising=False)
    m = _op_module()
    _sdpa_from(monkeypatch, 0)
    q, k, v = make_qkv(2, 2, 40, 40, 32, torch.float32, requires_grad=True)
    layout = torch.ones(2, 3, 3, dtype=torch.bool)
    assert m.prefers_dense(q, k, layout, 0.0, m.Backend.AUTO)
    assert not m.prefers_dense(q, k, layout, 0.0, m.Backend.REFERENCE)
    sparse = layout.clone()
    sparse[0, 1, 2] = False
    assert not m.prefers_dense(q, k, sparse, 0.0, m.Backend.AUTO)
    # decode (few queries against a cache) stays on the kernel
    assert not m.prefers_dense(q[:, :, :16], k, layout[:, :1], 0.0, m.Backend.AUTO)
    keep = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    keep[1, :, 30:] = False  # rows with no allowed key
    mask = {"none": None, "bool": keep,
            "additive": torch.zeros(2, 1, 40, 40).masked_fill(~keep, float("-inf"))}[mask_kind]
    out = block_sparse_attention(q, k, v, layout, (16, 16), attn_mask=mask, causal=causal)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, (16, 16), mask, causal, g)
    # the dense route's gradients come from SDPA's CPU backward, not our kernels: it sums
    # each gradient over 40 keys / queries in its own blocked order, so the bound is the
    # rounding of a 40-term sum (up to ~9x the reference's fp32 error seen on random inputs)
    check(out, (q.grad, k.grad, v.grad), truth, base, grad_reduction=40)


def test_auto_on_cpu_picks_an_available_backend(monkeypatch):
    monkeypatch.delenv("SPARSEKERNELS_BACKEND", raising=False)
    q, k, v = make_qkv(1, 1, 32, 32, 32, torch.float32)
    layout = torch.ones(1, 2, 2, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, layout, (16, 16))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-4,
                               atol=1e-5)


# --- errors ----------------------------------------------------------------------------------
def test_error_layout_shape():
    q, k, v = make_qkv(1, 2, 70, 70, 32, torch.float32)
    with pytest.raises(ValueError, match=r"layout must be \[heads, ceil\(Lq/bq\)"):
        block_sparse_attention(q, k, v, torch.ones(2, 2, 2, dtype=torch.bool), (32, 32))
    with pytest.raises(TypeError, match="layout must be a bool"):
        block_sparse_attention(q, k, v, torch.ones(2, 3, 3), (32, 32))


def test_error_block_size_dtype_and_mask():
    q, k, v = make_qkv(1, 2, 64, 64, 32, torch.float32)
    layout = torch.ones(2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="unsupported block size"):
        block_sparse_attention(q, k, v, layout, (48, 48))
    with pytest.raises(TypeError, match="dtype mismatch"):
        block_sparse_attention(q, k.half(), v, layout, (32, 32))
    with pytest.raises(ValueError, match="does not broadcast"):
        block_sparse_attention(q, k, v, layout, (32, 32), attn_mask=torch.ones(3, 1, 64, 64))
    with pytest.raises(ValueError, match="dropout_p"):
        block_sparse_attention(q, k, v, layout, (32, 32), dropout_p=1.0)


def test_error_explicit_backend_unavailable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(1, 1, 32, 32, 32, torch.float32)
    with pytest.raises(RuntimeError, match="sparsekernels.block_sparse_attention"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 1, dtype=torch.bool), (32, 32),
                               backend="cuda")


# --- grouped-query attention, KV caches, sliding windows ---------------------------------------
def transformers_allowed(lq, lk, causal, window):
    """Which keys each query sees, written out pair by pair from transformers' masking_utils
    (causal_mask_function: kv_idx <= q_idx; sliding_window_overlay: kv_idx > q_idx - window)
    with the queries at cache positions lk - lq .. lk - 1; without causal the window is
    symmetric, |q_idx - kv_idx| < window (FlashAttention's (window - 1, window - 1))."""
    ok = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        q_idx = lk - lq + i
        for kv_idx in range(lk):
            see = kv_idx <= q_idx if causal else True
            if window:
                see = see and kv_idx > q_idx - window and (causal or kv_idx < q_idx + window)
            ok[i, kv_idx] = see
    return ok


@pytest.mark.parametrize("lq,lk", [(1, 37), (5, 37), (37, 37), (12, 5)], ids=str)
@pytest.mark.parametrize("causal,window", [(True, 0), (True, 6), (False, 6), (True, 1)],
                         ids=["causal", "causal-w6", "bidirectional-w6", "causal-w1"])
def test_reference_positions_match_transformers_and_sdpa(lq, lk, causal, window):
    """The oracle's positions, checked against pair-by-pair rules and against SDPA on repeated
    key/value heads (what transformers does for grouped-query attention)."""
    allowed = transformers_allowed(lq, lk, causal, window)
    assert torch.equal(ref.position_mask(lq, lk, causal, window), allowed)
    try:  # transformers' own mask functions, where this transformers version has them
        from transformers import masking_utils as mu
        fn = (mu.sliding_window_causal_mask_function(window) if causal and window
              else mu.causal_mask_function if causal else None)
    except (ImportError, AttributeError):
        fn = None
    if fn is not None:
        t = torch.tensor
        theirs = torch.tensor([[bool(fn(t(0), t(0), t(lk - lq + i), t(j))) for j in range(lk)]
                               for i in range(lq)])
        assert torch.equal(theirs, allowed)
    if causal and not window and lq <= lk:  # FlashAttention >= 2.1's alignment, in torch
        from torch.nn.attention.bias import causal_lower_right
        assert torch.equal(causal_lower_right(lq, lk)._materialize(), allowed)
    q, k, v = make_qkv(2, 6, lq, lk, 16, torch.float64, kv_heads=2)
    layout = torch.ones(6, -(-lq // 16), -(-lk // 16), dtype=torch.bool)
    out, _ = ref.block_sparse_attention(q, k, v, layout, (16, 16), None, causal, 0.25,
                                        window=window)
    live = allowed.any(-1)
    expect = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1),
                                            v.repeat_interleave(3, 1),
                                            attn_mask=allowed | ~live[:, None], scale=0.25)
    torch.testing.assert_close(out[..., live, :], expect[..., live, :], rtol=1e-12, atol=1e-12)
    assert (out[..., ~live, :] == 0).all()


def test_reference_gqa_backward_matches_autograd():
    """dK, dV of a grouped key/value head sum its query heads' gradients."""
    q, k, v = make_qkv(2, 6, 9, 40, 16, torch.float64, requires_grad=True, kv_heads=2)
    bias = torch.randn(2, 1, 9, 40, dtype=torch.float64, requires_grad=True)
    layout = random_layout(6, 1, 3, 0.7)
    out, _ = ref.block_sparse_attention(q, k, v, layout, (16, 16), bias, True, 0.3, window=25)
    g = torch.randn_like(out)
    auto = torch.autograd.grad(out, (q, k, v, bias), g)
    mine = ref.block_sparse_attention_backward(g, q.detach(), k.detach(), v.detach(), layout,
                                               (16, 16), bias.detach(), True, 0.3, window=25)
    for a, m in zip(auto[:3], mine[:3]):
        torch.testing.assert_close(m, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mine[3].sum(1, keepdim=True), auto[3], rtol=1e-10, atol=1e-10)


# (query heads, key/value heads): group sizes 1, 2, 3 (SmolLM2's 9 / 3) and 4
GQA = {"g1": (4, 4), "g2": (4, 2), "g3": (9, 3), "g4": (8, 2)}


def _decode_cases():
    """backend x group x Lq x Lk; under the Triton interpreter the longest cache runs for
    the SmolLM2 group (g3) only (interpreter time)."""
    out = []
    for backend in ("reference", "cpu", "triton"):
        for name, heads in GQA.items():
            for lq in (1, 5, 16):
                for lk in (1, 97, 600):
                    if backend == "triton" and lk == 600 and name != "g3":
                        continue
                    out.append(pytest.param(backend, heads, lq, lk,
                                            id=f"{backend}-{name}-q{lq}-k{lk}"))
    return out


@pytest.mark.parametrize("backend,heads,lq,lk", _decode_cases())
def test_decode_against_kv_cache(backend, heads, lq, lk):
    """Lq new queries at the end of a cache of Lk keys (ragged, not block multiples), causal,
    grouped heads, a random layout with empty rows: forward and backward."""
    need(backend)
    h, hkv = heads
    lk = max(lk, lq)  # the queries are the last Lq of the keys
    bs = (16, 64)
    q, k, v = make_qkv(1, h, lq, lk, 64, torch.float32, requires_grad=True, kv_heads=hkv)
    layout = random_layout(h, 1, -(-lk // 64), 0.6)
    layout[0] = False  # a pruned head: zeros
    out = block_sparse_attention(q, k, v, layout, bs, causal=True, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, bs, None, True, g)
    # the gradients' rounding floor: a decode row's dq sums over the Lk cached keys, and every
    # gradient goes through dP = g . v over the D = 64 head dims (with one key, dS is 0 up to
    # the rounding of dP - rowsum(P dP), so the floor is all there is to compare with)
    check(out, (q.grad, k.grad, v.grad), truth, base, out_reduction=lk, grad_reduction=lk + 64)
    assert (out[:, 0] == 0).all() and (q.grad[:, 0] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("window", [1, 13, 64, 1000])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("lq,lk", [(4, 150), (70, 70), (45, 90)], ids=str)
def test_sliding_window(backend, window, causal, lq, lk):
    need(backend)
    h, hkv, bs = 4, 2, (16, 16)
    q, k, v = make_qkv(2, h, lq, lk, 32, torch.float32, requires_grad=True, kv_heads=hkv)
    layout = random_layout(h, -(-lq // 16), -(-lk // 16), 0.8)
    out = block_sparse_attention(q, k, v, layout, bs, causal=causal, window=window,
                                 backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, bs, None, causal, g, window=window)
    check(out, (q.grad, k.grad, v.grad), truth, base)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_blocks_outside_the_window_are_never_read(backend):
    """Keys and values of blocks that causal / the window / the layout leave entirely empty
    hold NaN: the kernels skip those blocks, so the result stays finite and exact."""
    need(backend)
    h, hkv, lq, lk, bs, window = 4, 2, 16, 200, (16, 16), 40
    q, k, v = make_qkv(1, h, lq, lk, 32, torch.float32, kv_heads=hkv)
    layout = random_layout(h, 1, -(-lk // 16), 0.7)
    layout[:, 0, -2] = True  # the newest blocks: read
    reached = m_eff = _op_module().effective_layout(layout, True, *bs, lq, lk, window)
    read = reached.any(0)[0]  # key blocks any head reads
    assert 2 <= int(read.sum()) < read.numel()
    k_nan, v_nan = k.clone(), v.clone()
    for kb in torch.nonzero(~read).flatten().tolist():
        k_nan[:, :, kb * 16:(kb + 1) * 16] = float("nan")
        v_nan[:, :, kb * 16:(kb + 1) * 16] = float("nan")
    out = block_sparse_attention(q, k_nan, v_nan, layout, bs, causal=True, window=window,
                                 backend=backend)
    truth, base = expected(q, k, v, m_eff, bs, None, True, None, window=window)
    check(out, None, truth, base)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("lq", [1, 7])
def test_padded_batch_decode(backend, mask_kind, lq):
    """A left-padded batch decoding against its cache (transformers' [B, 1, Lq, Lk] mask),
    grouped heads, a window; one sequence is padding only (its rows give zeros)."""
    need(backend)
    b, h, hkv, lk, bs = 4, 6, 2, 75, (16, 32)
    q, k, v = make_qkv(b, h, lq, lk, 32, torch.float32, requires_grad=True, kv_heads=hkv)
    lengths = torch.tensor([75, 40, 9, 0])
    keys_ok = torch.arange(lk)[None, :] >= (lk - lengths)[:, None]  # left padding
    keep = keys_ok[:, None, None, :].expand(b, 1, lq, lk)
    mask = (keep.contiguous() if mask_kind == "bool" else
            torch.zeros(b, 1, lq, lk).masked_fill(~keep, float("-inf")))
    layout = random_layout(h, 1, 3, 0.8, batch=b)
    out = block_sparse_attention(q, k, v, layout, bs, attn_mask=mask, causal=True, window=50,
                                 backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, bs, mask, True, g, window=50)
    check(out, (q.grad, k.grad, v.grad), truth, base, out_reduction=50)
    assert (out[3] == 0).all() and (q.grad[3] == 0).all()


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "triton"])
@pytest.mark.parametrize("lq", [0, 1, 20])
def test_no_keys_gives_zeros(backend, lq):
    """Lk = 0 (an empty cache): zeros everywhere and zero gradients, in every backend."""
    if backend != "auto":
        need(backend)
    q, k, v = make_qkv(2, 4, lq, 0, 32, torch.float32, requires_grad=True, kv_heads=2)
    layout = torch.zeros(4, -(-lq // 16), 0, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, layout, (16, 16), causal=True, backend=backend)
    assert out.shape == q.shape and (out == 0).all()
    out.backward(torch.randn_like(out))
    assert q.grad.shape == q.shape and (q.grad == 0).all()
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_more_queries_than_keys_empty_rows(backend):
    """Causal with Lq > Lk: the first Lq - Lk queries sit before every key and give zeros,
    with zero (finite) gradients."""
    need(backend)
    q, k, v = make_qkv(1, 4, 30, 12, 32, torch.float32, requires_grad=True, kv_heads=1)
    layout = torch.ones(4, 2, 1, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, layout, (16, 16), causal=True, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    assert (out[:, :, :18] == 0).all() and (q.grad[:, :, :18] == 0).all()
    truth, base = expected(q, k, v, layout, (16, 16), None, True, g)
    check(out, (q.grad, k.grad, v.grad), truth, base)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_cpu_split_keys_across_threads(threads):
    """Few work items (decode) are split along the cache across threads and merged: the same
    result for any thread count, with empty parts (a layout row with one block)."""
    need("cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = make_qkv(1, 3, 2, 900, 64, torch.float32, kv_heads=1)
        layout = random_layout(3, 1, 15, 0.5)
        layout[1] = False
        layout[1, 0, 7] = True  # one stored block: most parts of this head are empty
        out = block_sparse_attention(q, k, v, layout, (16, 64), causal=True, window=700,
                                     backend="cpu")
    finally:
        torch.set_num_threads(old)
    truth, base = expected(q, k, v, layout, (16, 64), None, True, None, window=700)
    check(out, None, truth, base, out_reduction=700)


def _bf16_cpu(native: bool):
    ext = importlib.import_module("sparsekernels.ops._ext")

    def run(q, k, v, layout, mask, causal, window, scale, bq, bk):
        lay = layout if layout.dim() == 4 else layout.unsqueeze(0)
        return ext.op(OP, "cpu")(q, k, v, lay, mask, causal, window, scale, bq, bk, native)[0]
    return run


BF16_CASES = {"decode-g3": (9, 3, 1, 600, 64, (16, 64), 0), "chunk-g2-window": (4, 2, 16, 300, 64, (16, 32), 100),
              "prefill-g1-d128": (2, 2, 130, 130, 128, (32, 64), 0), "prefill-g4-d16": (8, 2, 70, 70, 16, (16, 16), 30),
              "d32-b128": (2, 1, 40, 200, 32, (32, 128), 0)}


@pytest.mark.parametrize("native", [True, False], ids=["avx512bf16", "fp32-fallback"])
@pytest.mark.parametrize("case", list(BF16_CASES))
def test_cpu_bf16(native, case):
    """bf16 on the CPU kernel: AVX512-BF16 dot products with fp32 accumulation (where this CPU
    has them; the fallback converts to fp32), within about twice torch's own bf16 error."""
    need("cpu")
    if native and not torch.ops.sparsekernels_C.cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16 (the fallback case covers it)")
    h, hkv, lq, lk, d, bs, window = BF16_CASES[case]
    q, k, v = make_qkv(1, h, lq, lk, d, torch.bfloat16, kv_heads=hkv)
    layout = random_layout(h, -(-lq // bs[0]), -(-lk // bs[1]), 0.6)
    mask = torch.zeros(1, 1, lq, lk).masked_fill(torch.rand(1, 1, lq, lk) < 0.1, float("-inf"))
    out = _bf16_cpu(native)(q, k, v, layout, mask, True, window, d ** -0.5, *bs)
    assert out.dtype == torch.bfloat16
    truth, base = expected(q, k, v, layout, bs, mask, True, None, window=window)
    check(out, None, truth, base)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_public_bf16_gqa_decode(backend):
    need("cpu" if backend == "auto" else backend)
    q, k, v = make_qkv(2, 9, 4, 333, 64, torch.bfloat16, kv_heads=3)
    layout = torch.ones(9, 1, 6, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, layout, (16, 64), causal=True, window=200,
                                 backend=backend)
    truth, base = expected(q, k, v, layout, (16, 64), None, True, None, window=200)
    check(out, None, truth, base)


@pytest.mark.parametrize("case", ["gqa-causal-cache", "window", "mask-window"])
def test_auto_dense_route_keeps_positions(monkeypatch, clear_routes, case):
    """auto's dense SDPA route (all-true layout, more than 16 queries) keeps grouped heads,
    the end-aligned causal band and the window."""
    monkeypatch.delenv("SPARSEKERNELS_BACKEND", raising=False)
    m = _op_module()
    _sdpa_from(monkeypatch, 0)
    q, k, v = make_qkv(2, 6, 40, 70, 32, torch.float32, requires_grad=True, kv_heads=2)
    layout = torch.ones(6, 3, 5, dtype=torch.bool)
    assert m.prefers_dense(q, k, layout, 0.0, m.Backend.AUTO)
    window = {"gqa-causal-cache": 0, "window": 20, "mask-window": 9}[case]
    mask = None
    if case == "mask-window":
        mask = torch.ones(2, 1, 1, 70, dtype=torch.bool)
        mask[1, ..., :65] = False  # with window 9, most rows of sequence 1 see nothing
    out = block_sparse_attention(q, k, v, layout, (16, 16), attn_mask=mask, causal=True,
                                 window=window or None)
    g = torch.randn_like(out)
    out.backward(g)
    truth, base = expected(q, k, v, layout, (16, 16), mask, True, g, window=window)
    check(out, (q.grad, k.grad, v.grad), truth, base, grad_reduction=70)


def test_effective_layout_keeps_exactly_the_reachable_blocks():
    """A block survives causal / window pruning iff the element rule allows one of its pairs."""
    m = _op_module()
    for lq, lk, causal, window in [(5, 300, True, 0), (40, 300, True, 50), (70, 70, False, 20),
                                  (30, 12, True, 0), (16, 100, False, 3)]:
        bs = (16, 32)
        nq, nk = -(-lq // 16), -(-lk // 32)
        layout = torch.ones(1, nq, nk, dtype=torch.bool)
        eff = m.effective_layout(layout, causal, *bs, lq, lk, window)[0]
        pairs = F.pad(ref.position_mask(lq, lk, causal, window).float(),
                      (0, nk * 32 - lk, 0, nq * 16 - lq))
        has_pair = pairs.view(nq, 16, nk, 32).sum((1, 3)) > 0
        assert torch.equal(eff, has_pair), (lq, lk, causal, window)


def test_error_heads_and_window():
    q, k, v = make_qkv(1, 6, 8, 32, 32, torch.float32, kv_heads=4)
    layout = torch.ones(6, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="Hkv dividing"):
        block_sparse_attention(q, k, v, layout, (32, 32))
    q, k, v = make_qkv(1, 6, 8, 32, 32, torch.float32, kv_heads=3)
    with pytest.raises(ValueError, match="one row per query head"):
        block_sparse_attention(q, k, v, torch.ones(3, 1, 1, dtype=torch.bool), (32, 32))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be a positive int"):
            block_sparse_attention(q, k, v, layout, (32, 32), window=bad)


def test_eager_inference_runs_the_op_implementation():
    """Without gradients, eager calls run the op's implementation without the custom op's
    Python dispatch (half of a decode call): the same numbers; a dispatch mode (profilers,
    FakeTensorMode) and a gradient still go through the op."""
    need("cpu")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = make_qkv(1, 6, 3, 70, 32, torch.float32, kv_heads=2)
    layout = random_layout(6, 1, 2, 0.7)
    with torch.no_grad():
        fast = block_sparse_attention(q, k, v, layout, (16, 64), causal=True, backend="cpu")
    via_op, _ = torch.ops.sparsekernels.block_sparse_attention(
        q, k, v, layout, None, True, 0, 32 ** -0.5, 16, 64, 0.0, 0, "cpu")
    assert torch.equal(fast, via_op)
    with Record() as rec, torch.no_grad():
        block_sparse_attention(q, k, v, layout, (16, 64), causal=True, backend="cpu")
    assert "sparsekernels.block_sparse_attention.default" in rec.names
    with Record() as rec:
        block_sparse_attention(q.requires_grad_(), k, v, layout, (16, 64), causal=True,
                               backend="cpu")
    assert "sparsekernels.block_sparse_attention.default" in rec.names


# --- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_forward_backward(backend, dtype, head_dim, causal):
    dtype = DTYPES[dtype]
    need(backend, dtype, device="cuda")
    b, h, l, bs = 2, 4, 1000, (64, 64)
    q, k, v = make_qkv(b, h, l, l, head_dim, dtype, "cuda", requires_grad=True)
    nb = -(-l // 64)
    layout = random_layout(h, nb, nb, 0.25).cuda()
    mask = torch.ones(b, 1, 1, l, dtype=torch.bool, device="cuda")
    mask[1, ..., 900:] = False
    out = block_sparse_attention(q, k, v, layout, bs, attn_mask=mask, causal=causal,
                                 backend=backend)
    g = torch.randn_like(out)
    out.backward(g)  # the cuda backend's backward runs on Triton
    truth, base = expected(q, k, v, layout, bs, mask, causal, g)
    check(out, (q.grad, k.grad, v.grad), truth, base)


def test_layout_index_is_built_once_per_layout_until_it_changes():
    """The GPU paths index a layer's layout once, not every forward and backward."""
    from sparsekernels.ops.block_sparse_attention import (block_index, effective_layout,
                                                          layout_index)

    layout = torch.rand(3, 5, 4) < 0.5
    first = layout_index(layout, True, 32, 32, batch=2, contiguous=False)
    assert layout_index(layout, True, 32, 32, batch=2, contiguous=False) is first
    want = block_index(effective_layout(layout, True, 32, 32).unsqueeze(0))
    assert torch.equal(first[0][0], want[0][0]) and torch.equal(first[1][1], want[1][0])
    transposed = layout_index(layout, True, 32, 32, batch=2, contiguous=True, transposed=True)
    want_t = block_index(effective_layout(layout, True, 32, 32).transpose(-1, -2))
    assert torch.equal(transposed[0][1], want_t[0]) and torch.equal(transposed[1][0], want_t[1])
    layout[0].logical_not_()  # in place: the cached index is stale
    again = layout_index(layout, True, 32, 32, batch=2, contiguous=False)
    assert again is not first
    assert torch.equal(again[1][0], block_index(effective_layout(layout, True, 32, 32))[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_inference_without_statistics_gives_the_same_output(dtype, kv_heads):
    """An eager call that needs no gradient skips the softmax statistics (and reads the query
    rows of a one-head group in place) and runs the kernel's direct entry (no dispatcher),
    with the op's checks: the output is the op's, bit for bit, and bad operands are refused
    there as the op refuses them."""
    need("cpu", dtype)
    from sparsekernels.ops import _ext
    from sparsekernels.ops import block_sparse_attention as op_module

    q, k, v = make_qkv(2, 4, 70, 70, 32, dtype, kv_heads=kv_heads)
    layout = random_layout(4, 3, 3, 0.6)
    mask = torch.rand(2, 1, 1, 70) > 0.2
    args = (q, k, v, layout, mask, True, 0, 0.3, 32, 32, 0.0, 0)
    out, stats = op_module._run(op_module.Backend.CPU, *args)
    lean, none = op_module._run(op_module.Backend.CPU, *args, need_stats=False)
    assert stats.shape == (2, 4, 2, 70) and none is None
    assert torch.equal(lean, out)
    direct = _ext.direct("attention_inference")
    assert direct is not None
    with pytest.raises(RuntimeError, match="unsupported key block"):
        direct(q, k, v, layout[None], mask, True, 0, 0.3, 32, 48, False, False)
    with pytest.raises(RuntimeError, match="Hkv dividing H"):
        direct(q, k[:, :, :69], v, layout[None], mask, True, 0, 0.3, 32, 32, False, False)
    assert torch.equal(block_sparse_attention(q, k, v, layout, (32, 32), attn_mask=mask,
                                              causal=True, scale=0.3, backend="cpu"), out)


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_cpu_fp32_precision_bf16(case):
    """fp32 inputs with fp32_precision="bf16": both products of the inputs rounded to bf16
    (fp32 softmax, accumulation and output), so the output rounds to exactly the bf16
    kernel's on the rounded inputs, and it is within bf16's error of the float64 truth."""
    need("cpu")
    if not torch.ops.sparsekernels_C.cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: fp32_precision='bf16' changes nothing here")
    h, hkv, lq, lk, d, bs, window = BF16_CASES[case]
    q, k, v = make_qkv(2, h, lq, lk, d, torch.float32, kv_heads=hkv)
    layout = random_layout(h, -(-lq // bs[0]), -(-lk // bs[1]), 0.6)
    mask = torch.zeros(1, 1, lq, lk).masked_fill(torch.rand(1, 1, lq, lk) < 0.1, float("-inf"))
    kw = dict(attn_mask=mask, causal=True, window=window or None, backend="cpu")
    out = block_sparse_attention(q, k, v, layout, bs, fp32_precision="bf16", **kw)
    assert out.dtype == torch.float32
    rounded = [t.bfloat16() for t in (q, k, v)]
    assert torch.equal(out.bfloat16(), block_sparse_attention(*rounded, layout, bs, **kw))
    exact = block_sparse_attention(q, k, v, layout, bs, **kw)
    assert not torch.equal(out, exact)  # the products did run in bf16
    truth, _ = expected(q, k, v, layout, bs, mask, True, None, window=window)
    _, base = expected(*rounded, layout, bs, mask, True, None, window=window)
    check(out, None, truth, base)


# tiles with every score kept (no mask, no causal, no window): the bf16 kernels run the softmax
# step on the products' registers and rescale O in P V (the masked tiles above do neither)
UNMASKED_CASES = {"b64-d64": (4, 4, 128, 256, 64, (64, 64)),
                  "b16-d16-g2-ragged-rows": (4, 2, 70, 96, 16, (16, 16)),
                  "b32-d32-g4": (8, 2, 40, 128, 32, (32, 32)),
                  "b128-d128-ragged-keys": (2, 2, 130, 300, 128, (64, 128)),
                  "decode-g3": (9, 3, 1, 512, 64, (16, 64))}


@pytest.mark.parametrize("case", list(UNMASKED_CASES))
def test_cpu_bf16_unmasked_tiles(case):
    """bf16 inputs, and fp32 inputs with fp32_precision="bf16", where every tile's scores are
    kept: within bf16's error of the float64 truth (inputs scaled so that a row's max moves
    from key block to key block, and O is rescaled), and the fp32 one rounds to exactly the
    bf16 one on the rounded inputs."""
    need("cpu")
    if not torch.ops.sparsekernels_C.cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: the bf16 inputs run in fp32 (test_cpu_bf16)")
    h, hkv, lq, lk, d, bs = UNMASKED_CASES[case]
    q, k, v = make_qkv(2, h, lq, lk, d, torch.float32, kv_heads=hkv)
    q = q * 3.0  # scores of a few units: the running max changes
    layout = random_layout(h, -(-lq // bs[0]), -(-lk // bs[1]), 0.7)
    rounded = [t.bfloat16() for t in (q, k, v)]
    out = block_sparse_attention(*rounded, layout, bs, backend="cpu")
    truth, base = expected(*rounded, layout, bs)
    check(out, None, truth, base, out_reduction=lk if lq == 1 else 1)
    f32 = block_sparse_attention(q, k, v, layout, bs, backend="cpu", fp32_precision="bf16")
    assert f32.dtype == torch.float32
    assert torch.equal(f32.bfloat16(), out)
    truth32, _ = expected(q, k, v, layout, bs)
    check(f32, None, truth32, base, out_reduction=lk if lq == 1 else 1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp32-bf16-products"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_cpu_many_heads_query_blocks_in_a_row(dtype, masked):
    """Enough key/value heads that each thread takes all query blocks of one in a row and
    packs each K / V block once for them: random layouts (a block one query block stores and
    another skips), ragged blocks, grouped heads, with and without a mask, against float64."""
    need("cpu")
    torch.set_num_threads(2)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    q, k, v = make_qkv(4, 8, 200, 200, 64, dt, kv_heads=4)
    layout = random_layout(8, 4, 4, 0.6)
    mask = (torch.rand(4, 1, 1, 200) > 0.2) if masked else None
    kw = dict(attn_mask=mask, backend="cpu")
    if dtype == "fp32-bf16-products":
        if not torch.ops.sparsekernels_C.cpu_has_avx512_bf16():
            pytest.skip("this CPU has no AVX512-BF16")
        out = block_sparse_attention(q, k, v, layout, (64, 64), fp32_precision="bf16", **kw)
        rounded = [t.bfloat16() for t in (q, k, v)]
        assert torch.equal(out.bfloat16(),
                           block_sparse_attention(*rounded, layout, (64, 64), **kw))
        truth, _ = expected(q, k, v, layout, (64, 64), mask)
        _, base = expected(*rounded, layout, (64, 64), mask)
    else:
        out = block_sparse_attention(q, k, v, layout, (64, 64), **kw)
        truth, base = expected(q, k, v, layout, (64, 64), mask)
    check(out, None, truth, base)


@pytest.mark.parametrize("precision", ["ieee", "bf16", "int8"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_non_finite_inputs_make_nan_rows(dtype, masked, precision):
    """An inf in a query row, a nan in a key row or in a value row: the output rows that see
    it are nan, exactly those torch's SDPA makes nan -- never a finite row (the exponential
    once sent a nan score to 0), on the fused (plain) and the masked paths of every tile."""
    need("cpu")
    dt = DTYPES[dtype]
    q, k, v = make_qkv(2, 4, 64, 96, 64, dt, kv_heads=2)
    q[0, 0, 5, 7] = float("inf")
    k[0, 1, 9, 0] = float("nan")  # key / value head 1: query heads 2 and 3
    v[1, 0, 40, 3] = float("nan")  # batch 1, query heads 0 and 1
    layout = torch.ones(4, 1, 2, dtype=torch.bool)
    mask = torch.rand(2, 1, 64, 96) > 0.1 if masked else None
    if mask is not None:
        mask[..., 9] = mask[..., 40] = True
    out = block_sparse_attention(q, k, v, layout, (64, 64), attn_mask=mask, backend="cpu",
                                 fp32_precision=precision)
    expect = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1),
                                            v.float().repeat_interleave(2, 1), attn_mask=mask)
    assert torch.equal(out.isnan().any(-1), expect.isnan().any(-1))
    assert 0 < int(out.isnan().any(-1).sum()) < out.shape[0] * out.shape[1] * out.shape[2]


def test_fp32_precision_elsewhere_and_with_gradients():
    """"bf16" changes nothing for other dtypes; a forward that records gradients (the op's
    dispatcher path) gives the same output as plain inference, and its backward, computed in
    fp32, is within bf16's error of the float64 truth. A bad value is refused."""
    need("cpu")
    q, k, v = make_qkv(1, 4, 48, 48, 32, torch.float64)
    layout = torch.ones(4, 3, 3, dtype=torch.bool)
    plain = block_sparse_attention(q, k, v, layout, (16, 16), backend="cpu")
    assert torch.equal(block_sparse_attention(q, k, v, layout, (16, 16), backend="cpu",
                                              fp32_precision="bf16"), plain)
    with pytest.raises(ValueError, match="fp32_precision"):
        block_sparse_attention(q, k, v, layout, (16, 16), fp32_precision="tf32")
    q, k, v = make_qkv(1, 4, 48, 48, 32, torch.float32, requires_grad=True)
    with torch.no_grad():
        eager = block_sparse_attention(q, k, v, layout, (16, 16), backend="cpu",
                                       fp32_precision="bf16")
    out = block_sparse_attention(q, k, v, layout, (16, 16), backend="cpu",
                                 fp32_precision="bf16")
    assert torch.equal(out.detach(), eager)
    g = torch.randn_like(out)
    out.backward(g)
    rounded = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    truth, _ = expected(q, k, v, layout, (16, 16), None, False, g)
    _, base = expected(*rounded, layout, (16, 16), None, False, g)
    check(out.detach(), (q.grad, k.grad, v.grad), truth, base)
