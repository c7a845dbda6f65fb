"""Reference block-sparse attention: expand the block layout to an element mask, repeat the
key/value heads for grouped-query attention, then dense softmax attention. Simple on purpose
(the oracle); float64-capable, any device.

Positions: query i sits at position Lk - Lq + i (the queries are the last Lq positions of the
keys, as in a KV cache; FlashAttention >= 2.1 and transformers' caches align them so), key j
at position j. `causal` lets a query see the keys at or before its position; `window` (> 0)
lets it see the `window` most recent of those, itself included (transformers'
`sliding_window`: key j is visible from position p when p - window < j), and without
`causal` also the keys less than `window` positions after it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

LOG2E = 1.4426950408889634


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax statistics are fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def element_mask(layout: Tensor, block_size, lq: int, lk: int) -> Tensor:
    """Bool layout [(B,) H, nq, nk] -> bool element mask [B or 1, H, Lq, Lk]."""
    bq, bk = block_size
    if layout.dim() == 3:
        layout = layout.unsqueeze(0)
    full = layout.repeat_interleave(bq, dim=-2).repeat_interleave(bk, dim=-1)
    return full[..., :lq, :lk]


def position_mask(lq: int, lk: int, causal: bool, window: int = 0, device=None
                  ) -> Optional[Tensor]:
    """Bool [Lq, Lk]: which keys each query may see by position (None: all of them)."""
    if not causal and not window:
        return None
    p = torch.arange(lq, device=device)[:, None] + (lk - lq)  # the queries' positions
    j = torch.arange(lk, device=device)[None, :]
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= p
    if window:
        ok &= p - j < window
        if not causal:
            ok &= j - p < window
    return ok


def causal_mask(lq: int, lk: int, device) -> Tensor:
    """Causal with the queries at the end of the keys: query i sees j <= Lk - Lq + i."""
    return position_mask(lq, lk, True, 0, device)


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """[B, Hkv, L, D] -> [B, heads, L, D]: query head h reads key/value head h // (heads/Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def allowed_scores(q: Tensor, k: Tensor, layout: Tensor, block_size, attn_mask: Optional[Tensor],
                   causal: bool, scale: float, window: int = 0) -> Tensor:
    """The scores q k^T * scale + additive mask, -inf outside the layout / mask / positions.
    k has the query's heads (repeat_kv first)."""
    lq, lk = q.shape[-2], k.shape[-2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = element_mask(layout, block_size, lq, lk)
    by_position = position_mask(lq, lk, causal, window, q.device)
    if by_position is not None:
        allowed = allowed & by_position
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)
    return s.masked_fill(~allowed, float("-inf"))


def _softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    """(P, dead): the row softmax of s with rows that allow no key (all -inf, or no keys at
    all) set to zero, and the bool [.., 1] marker of those rows."""
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1)  # finite (and its gradient) on dead rows
    return p.masked_fill(dead, 0.0), dead


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: Tensor, block_size=(64, 64),
                           attn_mask: Optional[Tensor] = None, causal: bool = False,
                           scale: Optional[float] = None,
                           dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                           window: int = 0) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v over the allowed (layout x mask x positions) pairs.

    q [B, H, Lq, D]; k, v [B, Hkv, Lk, D] with Hkv dividing H. Returns (out [B, H, Lq, Dv],
    stats [B, H, 2, Lq] fp32, fp64 for fp64 inputs); a row with no allowed key (Lk = 0
    included) gets zeros. stats are the softmax statistics the kernels keep for the backward:
    the row max of the scores in log2 units (+inf on empty rows) and log2 of the row sum of
    exp2(scores - max) (kept apart so that a row padded by a huge finite mask keeps its
    normaliser). dropout_mask (bool, True = keep) drops probabilities after the softmax and
    rescales the kept ones by 1 / (1 - dropout_p).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    h = q.shape[1]
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    s = allowed_scores(q, k, layout, block_size, attn_mask, causal, scale, window)
    p, dead = _softmax(s)
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v)
    with torch.no_grad():
        s2 = s.double().masked_fill(dead, 0.0) * LOG2E
        m2 = (s2.amax(-1, keepdim=True) if s2.shape[-1]
              else s2.new_zeros(*s2.shape[:-1], 1))
        logl2 = torch.log2(torch.exp2(s2 - m2).sum(-1, keepdim=True))
        m2 = m2.masked_fill(dead, float("inf"))
        logl2 = logl2.masked_fill(dead, 0.0)
        stats = torch.cat([m2, logl2], dim=-1).transpose(-1, -2)
        stats = stats.to(stats_dtype(q.dtype))
    return out, stats


def block_sparse_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                    layout: Tensor, block_size=(64, 64),
                                    attn_mask: Optional[Tensor] = None, causal: bool = False,
                                    scale: Optional[float] = None,
                                    dropout_mask: Optional[Tensor] = None,
                                    dropout_p: float = 0.0, out: Optional[Tensor] = None,
                                    window: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dscores) of block_sparse_attention, by the textbook softmax gradient.
    dk, dv have k's heads: each key/value head sums the gradients of the query heads that
    read it. dscores [B, H, Lq, Lk] is also the gradient of an additive attn_mask (before
    any broadcasting); it is zero outside the allowed pairs. Given the forward's `out`, the
    row term rowsum(P * dP) is formed as rowsum(grad_out * out), as FlashAttention-2 does."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kv_shape = k.shape
    h, hkv = q.shape[1], k.shape[1]
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    s = allowed_scores(q, k, layout, block_size, attn_mask, causal, scale, window)
    p, _ = _softmax(s)
    g = grad_out.to(p.dtype)
    dp = torch.matmul(g, v.to(p.dtype).transpose(-1, -2))
    pd = p
    if dropout_mask is not None:
        keep = dropout_mask.to(p.dtype) / (1.0 - dropout_p)
        pd, dp = p * keep, dp * keep
    dv = torch.matmul(pd.transpose(-1, -2), g)
    delta = ((p * dp).sum(-1, keepdim=True) if out is None
             else (g * out.to(p.dtype)).sum(-1, keepdim=True))
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.to(p.dtype)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(p.dtype)) * scale
    if dk.shape[0] != kv_shape[0]:  # q broadcast over the batch
        dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
    # each key/value head: the sum over the query heads of its group
    dk = dk.unflatten(1, (hkv, h // hkv)).sum(2)
    dv = dv.unflatten(1, (hkv, h // hkv)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds
