"""Reference block-sparse attention: expand the block layout to an element mask, then dense
softmax attention. Simple on purpose (the oracle); float64-capable, any device."""

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


def causal_mask(lq: int, lk: int, device) -> Tensor:
    """Top-left aligned, like F.scaled_dot_product_attention(is_causal=True): row i sees j <= i."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def allowed_scores(q: Tensor, k: Tensor, layout: Tensor, block_size, attn_mask: Optional[Tensor],
                   causal: bool, scale: float) -> Tensor:
    """The scores q k^T * scale + additive mask, -inf outside the layout / mask / causal band."""
    lq, lk = q.shape[-2], k.shape[-2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = element_mask(layout, block_size, lq, lk)
    if causal:
        allowed = allowed & causal_mask(lq, lk, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)
    return s.masked_fill(~allowed, float("-inf"))


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: Tensor, block_size=(64, 64),
                           attn_mask: Optional[Tensor] = None, causal: bool = False,
                           scale: Optional[float] = None,
                           dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0
                           ) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v over the allowed (layout x mask x causal) pairs.

    Returns (out [B, H, Lq, Dv], stats [B, H, 2, Lq] fp32, fp64 for fp64 inputs); a row with
    no allowed key gets zeros. stats are the softmax statistics the kernels keep for the backward: the row max of
    the scores in log2 units (+inf on empty rows) and log2 of the row sum of exp2(scores - max)
    (kept apart so that a row padded by a huge finite mask keeps its normaliser).
    dropout_mask (bool, True = keep) drops probabilities after the softmax and rescales the
    kept ones by 1 / (1 - dropout_p).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = allowed_scores(q, k, layout, block_size, attn_mask, causal, scale)
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)  # keeps softmax (and its gradient) finite on empty rows
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v)
    with torch.no_grad():
        s2 = s.double() * LOG2E
        m2 = s2.amax(-1, keepdim=True)
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
                                    dropout_p: float = 0.0, out: Optional[Tensor] = None
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dscores) of block_sparse_attention, by the textbook softmax gradient.
    dscores [B, H, Lq, Lk] is also the gradient of an additive attn_mask (before any
    broadcasting); it is zero outside the allowed pairs. Given the forward's `out`, the row
    term rowsum(P * dP) is formed as rowsum(grad_out * out), as FlashAttention-2 does."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = allowed_scores(q, k, layout, block_size, attn_mask, causal, scale)
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
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
    if dk.shape[0] != k.shape[0]:  # q broadcast over the batch
        dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds
