"""Layout builders of sparsekernels.attention: shapes, patterns, and agreement with the
element-level patterns they stand for (a layout must cover every allowed pair)."""

from __future__ import annotations

import pytest
import torch

from sparsekernels.attention import layouts as L


def element_pattern(layout, block_size, lq, lk):
    from sparsekernels.ops.reference.block_sparse_attention import element_mask

    return element_mask(layout, block_size, lq, lk)[0]


@pytest.mark.parametrize("seq_len", [64, 100, 257])
@pytest.mark.parametrize("block_size", [(16, 16), (32, 64), (64, 32)], ids=str)
def test_causal_layout_is_the_smallest_cover(seq_len, block_size):
    lay = L.causal_layout(3, seq_len, block_size)
    assert lay.shape == (3, *L.grid(seq_len, seq_len, block_size)) and lay.dtype == torch.bool
    elem = element_pattern(lay, block_size, seq_len, seq_len)[0]
    tril = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    assert (elem | ~tril).all()  # covers every causal pair
    # and no block is entirely above the diagonal
    from sparsekernels.ops.block_sparse_attention import effective_layout

    assert torch.equal(effective_layout(lay, True, *block_size), lay)


@pytest.mark.parametrize("lq,lk", [(1, 300), (16, 300), (70, 200)], ids=str)
def test_causal_layout_with_a_kv_cache_is_the_smallest_cover(lq, lk):
    """More keys than queries: the queries are the last positions (the op's causal)."""
    from sparsekernels.ops.block_sparse_attention import effective_layout
    from sparsekernels.ops.reference.block_sparse_attention import causal_mask

    bs = (16, 32)
    lay = L.causal_layout(2, lq, bs, seq_len_k=lk)
    elem = element_pattern(lay, bs, lq, lk)[0]
    assert (elem | ~causal_mask(lq, lk, None)).all()
    assert torch.equal(effective_layout(lay, True, *bs, lq, lk), lay)
    assert lay[0, -1].all()  # the last queries see every key block


@pytest.mark.parametrize("window", [0, 50, 64, 300])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_covers_the_band_and_only_it(window, causal):
    n, bs = 300, (32, 32)
    lay = L.sliding_window_layout(2, n, window, bs, causal=causal)
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() <= window
    if causal:
        band &= i[None, :] <= i[:, None]
    elem = element_pattern(lay, bs, n, n)[0]
    assert (elem | ~band).all()
    # every kept block holds at least one pair of the band
    nq, nk = lay.shape[-2:]
    padded = torch.zeros(nq * 32, nk * 32, dtype=torch.bool)
    padded[:n, :n] = band
    has_pair = padded.view(nq, 32, nk, 32).any(-1).any(1)
    assert torch.equal(lay[0], has_pair)


def test_global_window_layout_bigbird():
    g = torch.Generator().manual_seed(0)
    lay = L.global_window_layout(4, 512, 64, global_blocks=2, block_size=64, random_blocks=1,
                                 generator=g)
    assert lay[:, :2, :].all() and lay[:, :, :2].all()
    window = L.sliding_window_layout(4, 512, 64, 64)
    assert (lay | ~window).all()
    extra = (lay & ~window)[:, 2:, 2:].sum(-1)
    assert (extra <= 1).all() and extra.sum() > 0  # the random blocks
    causal = L.global_window_layout(1, 512, 64, 1, 64, causal=True)
    assert not causal[0].triu(1).any()


def test_head_mask_layout_prunes_heads():
    base = L.sliding_window_layout(3, 128, 32, 32)
    lay = L.head_mask_layout(torch.tensor([1, 0, 1]), 128, block_size=32, base=base)
    assert not lay[1].any() and torch.equal(lay[0], base[0]) and torch.equal(lay[2], base[2])
    assert L.head_mask_layout(torch.tensor([True, False]), 100, 60, 32).shape == (2, 4, 2)
    with pytest.raises(ValueError, match="heads"):
        L.head_mask_layout(torch.ones(2), 128, block_size=32, base=base)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_random_layout_density(density):
    lay = L.random_layout(3, 256, 320, 32, density)
    assert lay.shape == (3, 8, 10)
    assert (lay.sum((-1, -2)) == round(density * 80)).all()
    assert L.density(lay) == pytest.approx(round(density * 80) / 80)


def test_topk_layout_keeps_the_heaviest_blocks():
    mass = torch.rand(2, 4, 8)
    lay = L.topk_layout(mass, 0.25)
    assert (lay.sum(-1) == 2).all()
    kept_min = mass.masked_fill(~lay, float("inf")).amin(-1)
    dropped_max = mass.masked_fill(lay, float("-inf")).amax(-1)
    assert (kept_min >= dropped_max).all()
    causal = L.topk_layout(torch.rand(1, 4, 4), 0.5, causal=True, block_size=16, seq_len=64)
    assert not causal[0].triu(1).any() and (causal.sum(-1) >= 1).all()
    assert not L.topk_layout(mass, 0.0).any()


def test_block_attention_mass_and_collector():
    probs = torch.softmax(torch.randn(2, 3, 40, 40), -1)
    mass = L.block_attention_mass(probs, 16)
    assert mass.shape == (3, 3, 3)
    torch.testing.assert_close(mass.sum(-1), torch.tensor([[32.0, 32.0, 16.0]]).expand(3, 3))
    col = L.AttentionMassCollector(16)
    col.update([probs, probs])
    col.update([torch.softmax(torch.randn(1, 3, 60, 60), -1)] * 2)  # longer batch: grid grows
    lays = col.layouts(0.5)
    assert len(lays) == 2 and lays[0].shape == (3, 4, 4)
    with pytest.raises(RuntimeError, match="no attention collected"):
        L.AttentionMassCollector(16).layouts(0.5)


def test_calibrate_layouts_on_a_tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                  intermediate_size=64, vocab_size=50,
                                  attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    batches = [dict(input_ids=torch.randint(0, 50, (2, 48))) for _ in range(2)]
    lays = L.calibrate_layouts(model, batches, block_density=0.34, block_size=16)
    assert len(lays) == 2 and all(t.shape == (2, 3, 3) for t in lays)
    assert all((t.sum(-1) == 1).all() for t in lays)


def test_crop():
    lay = L.dense_layout(2, 256, block_size=64)
    assert L.crop(lay, 2, 3).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="longest sequence"):
        L.crop(lay, 5, 4)
