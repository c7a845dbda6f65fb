"""The CPU kernel's fused softmax step (bf16 products; blocks with no mask and every key
visible): its rows' statistics are vector lanes, P comes from a degree-4 exp2 clamped at -150.

- Scores spread wide (q scaled up: most probabilities underflow, the running max moves between
  key blocks) stay within the forward's slack of the float64 truth on the inputs the products
  read (rounded to bf16), against torch's own bf16 result on them.
- A nan in one query row makes exactly that row nan (torch's attention does the same); the
  other rows are unchanged.
"""

from __future__ import annotations

import pytest
import torch

from sparsekernels.ops.block_sparse_attention import block_sparse_attention
from sparsekernels.testing import assert_close_to_reference
from tests.ops.test_block_sparse_attention import OUT_FACTOR, expected, make_qkv, need


def need_bf16_products():
    need("cpu")
    if not torch.ops.sparsekernels_C.cpu_has_avx512_vnni_bf16():
        pytest.skip("this CPU has no AVX512-BF16: the fused bf16 step does not run here")


# (heads, L, D, block): key blocks of 16 to 128 (register tiles of 24 to 3 rows)
SHAPES = {"b16-d64": (3, 96, 64, (16, 16)), "b64-d64": (4, 192, 64, (64, 64)),
          "b32x128-d32": (2, 256, 32, (32, 128)), "b128-d128": (2, 256, 128, (64, 128))}


def run(q, k, v, bs, precision):
    lay = torch.ones(q.shape[1], q.shape[2] // bs[0], k.shape[2] // bs[1], dtype=torch.bool)
    out = block_sparse_attention(q, k, v, lay, bs, fp32_precision=precision)
    return out, lay


@pytest.mark.parametrize("spread", [1.0, 40.0], ids=["plain", "wide"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_step_matches_float64(shape, dtype, spread):
    need_bf16_products()
    h, n, d, bs = SHAPES[shape]
    q, k, v = make_qkv(2, h, n, n, d, torch.float64)
    q = q * spread
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out, lay = run(q, k, v, bs, "bf16" if dtype == torch.float32 else "ieee")
    # the products read q, k, v rounded to bf16 (fp32 inputs are rounded as they are packed):
    # the truth is float64 attention of those, the baseline torch's own in bf16
    (truth, _), (base, _) = expected(*(t.to(torch.bfloat16) for t in (q, k, v)), lay, bs)
    assert_close_to_reference(out, truth, base, OUT_FACTOR)
    # torch's bf16 rounds the scores themselves, so with wide scores its error says little;
    # the kernel's own rounding: P to bf16 (2^-9 of a convex sum of v rows), the output to its
    # dtype (half an ulp), twice that
    p_round = 2.0 ** -9 * v.double().abs().max().item()
    out_round = torch.finfo(dtype).eps / 2 * truth.abs().max().item()
    err = (out.double() - truth).abs().max().item()
    assert err <= 2 * (p_round + out_round), (err, p_round, out_round)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-bf16"])
def test_nan_in_a_query_row_stays_in_that_row(dtype):
    need_bf16_products()
    h, n, d, bs = SHAPES["b64-d64"]
    q, k, v = make_qkv(2, h, n, n, d, dtype)
    b, head, row = (int(torch.randint(0, s, ())) for s in (2, h, n))
    clean, _ = run(q, k, v, bs, "bf16" if dtype == torch.float32 else "ieee")
    q[b, head, row, int(torch.randint(0, d, ()))] = float("nan")
    out, _ = run(q, k, v, bs, "bf16" if dtype == torch.float32 else "ieee")
    bad = torch.isnan(out).any(-1)
    expect = torch.zeros_like(bad)
    expect[b, head, row] = True
    assert torch.equal(bad, expect), f"nan rows {bad.nonzero().tolist()}, want {[b, head, row]}"
    assert torch.isnan(out[b, head, row]).all()
    keep = ~expect
    assert torch.equal(out[keep], clean[keep])
