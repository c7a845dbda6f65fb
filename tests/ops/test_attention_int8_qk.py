"""block_sparse_attention(..., fp32_precision="int8") on the CPU: q k^T in int8 (each query and
key row quantized on the fly with its own scale, VNNI products summed exactly in int32), the
softmax in fp32 and P V in bf16.

The bounds: against a float64 emulation of the same quantization (q and k replaced by their
int8 values times their scales), the kernel is within the bf16 rounding of P and V (STYLE.md's
rule, with torch's bf16 attention as the baseline); against the float64 truth, its error is at
most twice what the quantization of q and k alone causes, plus that bf16 slack -- and it is
closer to the emulation than to the truth, so the int8 products did run.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsekernels.ops.block_sparse_attention import block_sparse_attention
from sparsekernels.ops.reference import block_sparse_attention as ref
from sparsekernels.testing import assert_close_to_reference, max_abs_err
from tests.ops.test_block_sparse_attention import OUT_FACTOR, make_qkv, need, random_layout


def need_int8():
    need("cpu")
    if not torch.ops.sparsekernels_C.cpu_has_avx512_vnni_bf16():
        pytest.skip("this CPU has no AVX512-VNNI and -BF16: 'int8' runs as 'bf16' here")


def quantized(x: torch.Tensor) -> torch.Tensor:
    """x's rows as the kernel quantizes them, in float64: round(x * (127 / max|x|)) (fp32
    product, round half to even) times max|x| / 127 (fp32)."""
    x32 = x.detach().float()
    amax = x32.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return torch.round(x32 * inv).double() * (amax / 127.0).double()


def attention(q, k, v, layout, bs, mask, causal, window, dtype=torch.float64):
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    out, _ = ref.block_sparse_attention(q.detach().to(dtype), k.detach().to(dtype),
                                        v.detach().to(dtype), layout, bs, m, causal,
                                        1.0 / math.sqrt(q.shape[-1]), window=window)
    return out


# (heads, kv heads, Lq, Lk, D, block, masked, causal, window)
CASES = {"b64-d64": (4, 4, 128, 128, 64, (64, 64), False, False, 0),
         "gqa-masked-causal-window": (4, 2, 70, 70, 32, (32, 32), True, True, 40),
         "ragged-keys-b128-d128": (2, 2, 130, 300, 128, (64, 128), False, False, 0),
         "decode-g3": (9, 3, 1, 512, 64, (16, 64), False, False, 0),
         "b16-d16-bool-mask": (4, 2, 40, 96, 16, (16, 16), True, False, 0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_int8_qk(case, dtype):
    need_int8()
    h, hkv, lq, lk, d, bs, masked, causal, window = CASES[case]
    q, k, v = make_qkv(2, h, lq, lk, d, dtype, kv_heads=hkv)
    q = (q.double() * 3.0).to(dtype)  # scores of a few units: the running max moves
    q[0, 0, 0] = 0  # a zero row: scale 0, uniform weights
    k[1, 0, 3] = 0
    layout = random_layout(h, -(-lq // bs[0]), -(-lk // bs[1]), 0.7)
    mask = None
    if masked and case.endswith("bool-mask"):
        mask = torch.rand(2, 1, 1, lk) > 0.2
    elif masked:
        mask = torch.zeros(1, 1, lq, lk).masked_fill(torch.rand(1, 1, lq, lk) < 0.1,
                                                     float("-inf"))
    kw = dict(attn_mask=mask, causal=causal, window=window or None, backend="cpu")
    out = block_sparse_attention(q, k, v, layout, bs, fp32_precision="int8", **kw)
    assert out.dtype == dtype
    emulated = attention(quantized(q), quantized(k), v, layout, bs, mask, causal, window)
    truth = attention(q, k, v, layout, bs, mask, causal, window)
    bf16 = attention(q, k, v, layout, bs, mask, causal, window, torch.bfloat16)
    reduction = lk if lq == 1 else 1
    # the int8 products themselves: the rest rounds as bf16 attention does
    assert_close_to_reference(out, emulated, bf16, factor=OUT_FACTOR, name="out vs emulation",
                              reduction=reduction)
    slack = OUT_FACTOR * max_abs_err(bf16, truth)
    quant = max_abs_err(emulated, truth)
    err = max_abs_err(out, truth)
    assert err <= 2 * quant + slack, f"error {err:.3e} > 2 x {quant:.3e} + {slack:.3e}"
    assert max_abs_err(out, emulated) < 0.5 * err  # the products did run in int8


def test_int8_qk_changes_nothing_for_fp64():
    need("cpu")
    q, k, v = make_qkv(2, 2, 40, 40, 32, torch.float64)
    layout = torch.ones(2, 2, 2, dtype=torch.bool)
    assert torch.equal(block_sparse_attention(q, k, v, layout, (32, 32), backend="cpu",
                                              fp32_precision="int8"),
                       block_sparse_attention(q, k, v, layout, (32, 32), backend="cpu"))


def test_int8_qk_with_gradients_recorded():
    """A forward that records gradients (the op's dispatcher path, statistics kept) gives the
    same output as plain inference; its backward runs in fp32."""
    need_int8()
    q, k, v = make_qkv(1, 4, 64, 64, 32, torch.float32, requires_grad=True)
    layout = torch.ones(4, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        eager = block_sparse_attention(q, k, v, layout, (32, 32), backend="cpu",
                                       fp32_precision="int8")
    out = block_sparse_attention(q, k, v, layout, (32, 32), backend="cpu",
                                 fp32_precision="int8")
    assert torch.equal(out.detach(), eager)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
