"""Unit choice: rounding, ties, global ranking and caps."""

import math

import pytest
import torch

from sparsekernels.pruning.granularity import (
    BlockPool, ChannelMember, ChannelPool, ElementPool, channel_pool, select_global,
    select_local, units_to_prune)


@pytest.mark.parametrize("units,sparsity,expected", [
    (10, 0.25, 3), (10, 0.24, 2), (4, 0.125, 1), (7, 0.0, 0), (1, 0.5, 1), (97, 0.5, 49)])
def test_round_half_up(units, sparsity, expected):
    assert units_to_prune(units, sparsity) == expected


def test_select_local_prunes_lowest_and_breaks_ties_by_index():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    keep = select_local(scores, 0.4)
    assert keep.tolist() == [True, False, True, False, True]
    keep = select_local(torch.ones(4), 0.5)
    assert keep.tolist() == [False, False, True, True]


@pytest.mark.parametrize("n,k", [(1, 0), (1, 1), (97, 48), (1025, 1), (1025, 1024)])
def test_prune_lowest_equals_stable_sort(n, k):
    from sparsekernels.pruning.granularity import prune_lowest
    scores = torch.randint(0, 7, (n,)).double()          # many ties
    reference = torch.ones(n, dtype=torch.bool)
    reference[torch.sort(scores, stable=True).indices[:k]] = False
    assert torch.equal(prune_lowest(scores, k), reference)


def test_select_global_matches_one_threshold_for_equal_units():
    a, b = torch.rand(30), torch.rand(50)
    keeps = select_global([a, b], [torch.ones(30, dtype=torch.long),
                                   torch.ones(50, dtype=torch.long)], 0.5, [1.0, 1.0])
    both = torch.cat([a, b])
    threshold = torch.sort(both).values[39]
    pruned = torch.cat([~keeps[0], ~keeps[1]])
    assert int(pruned.sum()) == 40
    assert bool((both[pruned] <= threshold).all()) and bool((both[~pruned] > threshold).all())


def test_select_global_respects_caps_and_lands_within_one_unit():
    a = torch.rand(10) * 0.1          # all of pool a would be pruned first
    b = torch.rand(20)
    sizes = [torch.full((10,), 8, dtype=torch.long), torch.full((20,), 3, dtype=torch.long)]
    keeps = select_global([a, b], sizes, 0.5, [0.3, 1.0])
    assert int((~keeps[0]).sum()) == 3          # floor(0.3 * 10)
    pruned = 8 * int((~keeps[0]).sum()) + 3 * int((~keeps[1]).sum())
    target = math.floor(0.5 * (80 + 60) + 0.5)
    assert abs(pruned - target) <= 3


def test_element_and_block_pools_round_trip():
    w = torch.randn(8, 6)
    pool = BlockPool("m", (8, 6), (4, 3))
    x = pool.unit_matrix({"m": w})
    assert x.shape == (4, 12)
    assert torch.equal(x[1], w[0:4, 3:6].reshape(-1))
    keep = torch.tensor([True, False, True, True])
    mask = pool.masks(keep)["m"]["weight"]
    assert float(mask[0:4, 3:6].sum()) == 0 and float(mask.sum()) == 36
    e = ElementPool("m", (8, 6))
    assert e.masks(torch.arange(48) % 2 == 0)["m"]["weight"].sum() == 24


def test_channel_pool_rows_columns_and_bias():
    w = torch.randn(5, 4)
    rows = channel_pool("m", (5, 4), 0)
    assert torch.equal(rows.unit_matrix({"m": w}), w)
    m = rows.masks(torch.tensor([True, False, True, True, False]))["m"]
    assert m["weight"][1].sum() == 0 and m["bias"].tolist() == [1, 0, 1, 1, 0]
    cols = channel_pool("m", (5, 4), 1)
    assert torch.equal(cols.unit_matrix({"m": w}), w.t())
    assert "bias" not in cols.masks(torch.ones(4, dtype=torch.bool))["m"]


def test_channel_pool_across_members():
    a, b = torch.randn(4, 3), torch.randn(2, 4)
    pool = ChannelPool((ChannelMember("a", 0, torch.arange(4).view(4, 1), (4, 3)),
                        ChannelMember("b", 1, torch.arange(4).view(4, 1), (2, 4))))
    x = pool.unit_matrix({"a": a, "b": b})
    assert torch.equal(x, torch.cat([a, b.t()], dim=1))
    assert pool.unit_sizes().tolist() == [5, 5, 5, 5]
    masks = pool.masks(torch.tensor([True, True, False, True]))
    assert masks["a"]["weight"][2].sum() == 0 and masks["b"]["weight"][:, 2].sum() == 0


@pytest.mark.parametrize("equal_sizes", [True, False])
def test_select_global_equals_brute_force_closest_prefix(equal_sizes):
    scores = [torch.randint(0, 5, (n,)).double() for n in (7, 11, 5)]
    sizes = [torch.full((n,), 4, dtype=torch.long) if equal_sizes
             else torch.randint(1, 6, (n,)) for n in (7, 11, 5)]
    caps = [1.0, 0.5, 1.0]
    keeps = select_global(scores, sizes, 0.4, caps)
    # brute force: eligible units, global stable order, closest prefix (ties: shorter)
    units = []
    for p, (sc, cap) in enumerate(zip(scores, caps)):
        lowest = torch.sort(sc, stable=True).indices[: math.floor(cap * sc.numel() + 1e-9)]
        units += [(float(sc[u]), p, int(u)) for u in sorted(lowest.tolist())]
    units.sort(key=lambda t: t[0])                       # Python's sort is stable
    target = math.floor(0.4 * sum(int(s.sum()) for s in sizes) + 0.5)
    prefix, best = 0, (target, 0)
    for i, (_, p, u) in enumerate(units, 1):
        prefix += int(sizes[p][u])
        if abs(prefix - target) < best[0]:
            best = (abs(prefix - target), i)
    expected = {(p, u) for _, p, u in units[: best[1]]}
    got = {(p, u) for p, k in enumerate(keeps) for u in (~k).nonzero().flatten().tolist()}
    assert got == expected
