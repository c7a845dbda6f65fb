"""Block layouts for block-sparse attention: which (query block, key block) pairs are computed.

A layout is a bool tensor [heads, ceil(Lq/bq), ceil(Lk/bk)] (or with a leading batch dim),
the `layout` argument of sparsekernels.ops.block_sparse_attention. Builders here are pure
torch and cheap; they work at block granularity, so a layout is the smallest set of blocks
that covers the pattern (sliding windows that do not end on block edges keep the partial
blocks; combine with an element mask for an exact window).

Builders: dense, from a head mask (pruned heads), causal, sliding window, global + window
(Longformer / BigBird, with optional random blocks) and data-driven (the key blocks that carry
the most attention probability per query block, on calibration batches).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor


def _pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, int):
        return block_size, block_size
    bq, bk = (int(b) for b in block_size)
    return bq, bk


def grid(seq_len_q: int, seq_len_k: Optional[int] = None, block_size=64) -> tuple[int, int]:
    """(ceil(Lq/bq), ceil(Lk/bk)): the layout's block grid for these sequence lengths."""
    bq, bk = _pair(block_size)
    lk = seq_len_q if seq_len_k is None else seq_len_k
    return -(-seq_len_q // bq), -(-lk // bk)


def _block_ranges(n_blocks: int, block: int, seq_len: int, device=None) -> tuple[Tensor, Tensor]:
    first = torch.arange(n_blocks, device=device) * block
    last = torch.clamp(first + block - 1, max=seq_len - 1)
    return first, last


def density(layout: Tensor) -> float:
    """Fraction of true blocks."""
    return layout.float().mean().item() if layout.numel() else 0.0


def dense_layout(heads: int, seq_len_q: int, seq_len_k: Optional[int] = None, block_size=64,
                 device=None) -> Tensor:
    """Every block computed: the op then equals dense attention."""
    return torch.ones(heads, *grid(seq_len_q, seq_len_k, block_size), dtype=torch.bool,
                      device=device)


def head_mask_layout(head_mask: Tensor, seq_len_q: int, seq_len_k: Optional[int] = None,
                     block_size=64, base: Optional[Tensor] = None) -> Tensor:
    """A pruned head (head_mask False / 0) gets an all-false layout: it costs nothing and
    outputs zeros, which is how pruned heads run before the model is resized. `base` (a
    [heads, nq, nk] layout, default dense) is kept for the other heads."""
    keep = head_mask.to(torch.bool).flatten()
    heads = keep.numel()
    if base is None:
        base = dense_layout(heads, seq_len_q, seq_len_k, block_size, device=head_mask.device)
    if base.shape[-3] != heads:
        raise ValueError(f"head_mask has {heads} heads, the base layout {base.shape[-3]}")
    return base & keep.view(heads, 1, 1).to(base.device)


def causal_layout(heads: int, seq_len: int, block_size=64, device=None,
                  seq_len_k: Optional[int] = None) -> Tensor:
    """The blocks on or below the diagonal: a block is kept when any of its query positions
    may see any of its key positions. With seq_len_k > seq_len the queries are the last
    positions of the keys (a KV cache), as the op's `causal` aligns them."""
    bq, bk = _pair(block_size)
    lk = seq_len if seq_len_k is None else seq_len_k
    nq, nk = grid(seq_len, lk, (bq, bk))
    _, q_last = _block_ranges(nq, bq, seq_len, device)
    k_first, _ = _block_ranges(nk, bk, lk, device)
    lay = k_first[None, :] <= q_last[:, None] + (lk - seq_len)
    return lay.expand(heads, nq, nk).clone()


def sliding_window_layout(heads: int, seq_len: int, window: int, block_size=64,
                          causal: bool = False, device=None) -> Tensor:
    """Query i sees keys j with |i - j| <= window (j <= i too when causal), at block
    granularity: a block is kept when any of its (i, j) pairs is in the band."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    bq, bk = _pair(block_size)
    nq, nk = grid(seq_len, seq_len, (bq, bk))
    q_first, q_last = _block_ranges(nq, bq, seq_len, device)
    k_first, k_last = _block_ranges(nk, bk, seq_len, device)
    # the closest pair of two ranges is within the window
    lo_gap = q_first[:, None] - k_last[None, :]  # > 0: keys entirely before the queries
    hi_gap = k_first[None, :] - q_last[:, None]  # > 0: keys entirely after the queries
    lay = (lo_gap <= window) & (hi_gap <= (0 if causal else window))
    return lay.expand(heads, nq, nk).clone()


def global_window_layout(heads: int, seq_len: int, window: int, global_blocks: int = 1,
                         block_size=64, random_blocks: int = 0, causal: bool = False,
                         generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """Longformer / BigBird: a sliding window, plus `global_blocks` leading blocks that attend
    to everything and are attended by everything, plus (BigBird) `random_blocks` random key
    blocks per query block and head."""
    lay = sliding_window_layout(heads, seq_len, window, block_size, causal=False, device=device)
    nq, nk = lay.shape[-2:]
    g = max(0, int(global_blocks))
    lay[:, :g, :] = True
    lay[:, :, :g] = True
    if random_blocks > 0:
        scores = torch.rand(heads, nq, nk, generator=generator).to(lay.device)
        picks = scores.topk(min(int(random_blocks), nk), dim=-1).indices
        lay.scatter_(-1, picks, True)
    if causal:
        lay &= causal_layout(heads, seq_len, block_size, device=lay.device)
    return lay


def random_layout(heads: int, seq_len_q: int, seq_len_k: Optional[int] = None, block_size=64,
                  block_density: float = 0.1, generator: Optional[torch.Generator] = None,
                  device=None) -> Tensor:
    """Exactly round(block_density * nq * nk) random blocks per head (benchmarks, tests)."""
    nq, nk = grid(seq_len_q, seq_len_k, block_size)
    n = nq * nk
    keep = round(float(block_density) * n)
    order = torch.rand(heads, n, generator=generator).argsort(-1)
    lay = torch.zeros(heads, n, dtype=torch.bool)
    lay.scatter_(-1, order[:, :keep], True)
    return lay.view(heads, nq, nk).to(device)


def block_attention_mass(probs: Tensor, block_size=64) -> Tensor:
    """Attention probabilities [..., H, Lq, Lk] -> probability mass per block [H, nq, nk],
    summed over every leading (batch) dim."""
    bq, bk = _pair(block_size)
    lq, lk = probs.shape[-2:]
    nq, nk = grid(lq, lk, (bq, bk))
    p = probs.detach().float()
    p = torch.nn.functional.pad(p, (0, nk * bk - lk, 0, nq * bq - lq))
    p = p.reshape(*p.shape[:-2], nq, bq, nk, bk).sum(dim=(-3, -1))
    while p.dim() > 3:
        p = p.sum(0)
    return p


def topk_layout(mass: Tensor, block_density: float, causal: bool = False,
                block_size=64, seq_len: Optional[int] = None) -> Tensor:
    """Data-driven: per query block, keep the key blocks with the most attention mass, up to
    max(1, round(block_density * nk)) blocks per query block (ties keep the lower index)."""
    if not 0.0 <= float(block_density) <= 1.0:
        raise ValueError(f"block_density must be in [0, 1], got {block_density}")
    heads, nq, nk = mass.shape
    keep = max(1, round(float(block_density) * nk)) if block_density > 0 else 0
    allowed = torch.ones_like(mass, dtype=torch.bool)
    if causal:
        lq = seq_len if seq_len is not None else nq * _pair(block_size)[0]
        allowed = causal_layout(heads, lq, block_size, device=mass.device)
    score = mass.masked_fill(~allowed, float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    lay = torch.zeros_like(allowed)
    if keep:
        lay.scatter_(-1, order[..., :keep], True)
    return lay & allowed


class AttentionMassCollector:
    """Accumulates per-layer block attention mass from attention probabilities, e.g. a model's
    `output_attentions` on calibration batches, then turns them into layouts:

        collector = AttentionMassCollector(block_size=64)
        for batch in calibration:
            out = model(**batch, output_attentions=True)   # eager attention
            collector.update(out.attentions)
        layouts = collector.layouts(block_density=0.25)

    Sequences of different lengths accumulate into the grid of the longest one.
    """

    def __init__(self, block_size=64):
        self.block_size = _pair(block_size)
        self.mass: list[Tensor] = []

    def update(self, attentions: Sequence[Tensor]) -> None:
        for i, probs in enumerate(attentions):
            m = block_attention_mass(probs, self.block_size)
            if i == len(self.mass):
                self.mass.append(m)
                continue
            old = self.mass[i]
            nq, nk = max(old.shape[1], m.shape[1]), max(old.shape[2], m.shape[2])
            grow = lambda t: torch.nn.functional.pad(t, (0, nk - t.shape[2], 0, nq - t.shape[1]))
            self.mass[i] = grow(old) + grow(m.to(old.device))

    def layouts(self, block_density: float, causal: bool = False) -> list[Tensor]:
        if not self.mass:
            raise RuntimeError("no attention collected: call update(outputs.attentions) first")
        return [topk_layout(m, block_density, causal, self.block_size) for m in self.mass]


@torch.no_grad()
def calibrate_layouts(model, batches: Iterable[dict], block_density: float, block_size=64,
                      causal: bool = False) -> list[Tensor]:
    """Per attention layer, the data-driven layout of `model` on calibration `batches` (dicts
    of model inputs): runs the model with output_attentions=True, so its attention
    implementation must return probabilities (eager)."""
    collector = AttentionMassCollector(block_size)
    for batch in batches:
        out = model(**batch, output_attentions=True)
        attentions = getattr(out, "attentions", None) or getattr(out, "encoder_attentions", None)
        if not attentions:
            raise RuntimeError("the model returned no attentions: load it with "
                               "attn_implementation='eager' for calibration")
        collector.update(attentions)
    return collector.layouts(block_density, causal)


def crop(layout: Tensor, nq: int, nk: int) -> Tensor:
    """The top-left [.., nq, nk] of a layout: one built for the longest sequence serves every
    shorter one."""
    if layout.shape[-2] >= nq and layout.shape[-1] >= nk:
        return layout[..., :nq, :nk]
    raise ValueError(f"layout grid {tuple(layout.shape[-2:])} is smaller than the sequence's "
                     f"block grid {(nq, nk)}: build the layout for the longest sequence")


__all__ = [
    "AttentionMassCollector", "block_attention_mass", "calibrate_layouts", "causal_layout",
    "dense_layout", "density", "global_window_layout", "grid", "head_mask_layout",
    "random_layout", "sliding_window_layout", "crop", "topk_layout",
]
