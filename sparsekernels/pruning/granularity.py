"""Pruning units and how a target sparsity turns unit scores into masks.

One job: given an importance per *unit* (an element, a block, a channel, a head, or a
channel coupled across several layers), choose which units to prune.

A :class:`Pool` is a set of units ranked against each other. ``unit_matrix`` gathers a
canonical weight-shaped tensor per module into ``[units, values]`` (one row per unit);
a criterion reduces each row to a score; ``masks`` expands a kept/pruned vector back to
canonical masks. Pools:

* :class:`ElementPool` - every element is a unit (``"fine"``; 1-D norm weights).
* :class:`RowGroupPool` - every element is a unit, chosen within groups of ``group``
  consecutive input features of one row: N:M patterns (``group = M``) and the per-row
  comparison of Wanda (``group = in``).
* :class:`BlockPool` - ``[bm, bk]`` tiles of the canonical weight seen as
  ``[out, in * kernel]`` (the layout ``SparseLinear`` runs).
* :class:`ChannelPool` - unit ``u`` owns ``index[u]`` along a canonical dim of one or
  more modules: a row (``"out_channel"``), a column (``"in_channel"``), an attention
  head across Q/K/V rows and O columns (``"head"``), or a channel shared by coupled
  layers (dependency-aware mode).

Rounding: a pool of ``U`` units at sparsity ``s`` prunes ``floor(s * U + 0.5)`` units
(round half up). A global ranking prunes the lowest-scoring units across pools until the
pruned element count is as close as possible to ``floor(s * N + 0.5)`` (``N`` elements),
so it lands within one unit of the target; per-pool caps (``max_sparsity_per_layer``)
allow at most ``floor(cap * U)`` units of a pool. A :class:`RowGroupPool` spreads the
count ``floor(s * U + 0.5)`` over its groups in order (group ``g`` prunes
``round(s * (g + 1) * group) - round(s * g * group)``), so every group is within one unit
of ``s * group`` and the total is exact; an N:M pattern prunes ``M - N`` in every group.
Ties go to the unit that comes first
(stable sort), in pool order then unit order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from sparsekernels.formats.block_sparse import units_to_prune

CanonicalMasks = dict[str, dict[str, torch.Tensor]]


def spread_counts(sizes: Sequence[int] | torch.Tensor, sparsity: float) -> torch.Tensor:
    """Units to prune in each of consecutive chunks of ``sizes`` units (long tensor): the
    rounded cumulative target, so the chunks add up to
    ``units_to_prune(sum(sizes), sparsity)`` and each is within one unit of
    ``sparsity * size``."""
    seen = torch.cumsum(torch.as_tensor(sizes, dtype=torch.float64), 0)
    upto = torch.floor(float(sparsity) * seen + 0.5).long()   # float64: units_to_prune's rule
    return torch.diff(upto, prepend=upto.new_zeros(1))


class Pool:
    """Units that are ranked together. Subclasses define the unit layout."""

    num_units: int
    modules: tuple[str, ...]

    def unit_matrix(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def unit_sizes(self) -> torch.Tensor:
        """Weight elements per unit, ``[num_units]`` (for global ranking)."""
        raise NotImplementedError

    def masks(self, keep: torch.Tensor) -> CanonicalMasks:
        """Canonical ``{"weight": ..., "bias": ...}`` masks for each module."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Keep mask over the units for a per-pool ``sparsity`` (lowest scores pruned)."""
        return select_local(scores, sparsity)


@dataclass(frozen=True)
class ElementPool(Pool):
    module: str
    shape: tuple[int, ...]
    prune_bias: bool = False   # 1-D norm weights: the bias channel follows the weight

    @property
    def modules(self):  # type: ignore[override]
        return (self.module,)

    @property
    def num_units(self):  # type: ignore[override]
        return math.prod(self.shape)

    def unit_matrix(self, tensors):
        return tensors[self.module].reshape(-1, 1)

    def unit_sizes(self):
        return torch.ones(self.num_units, dtype=torch.long)

    def masks(self, keep):
        weight = keep.to(torch.float32).view(self.shape)
        out = {"weight": weight}
        if self.prune_bias:
            out["bias"] = weight.clone()
        return {self.module: out}


@dataclass(frozen=True)
class RowGroupPool(Pool):
    """Elements of the canonical weight seen as ``[out, in * kernel]``, chosen within each
    group of ``group`` consecutive columns of a row (N:M: ``group = M``)."""

    module: str
    shape: tuple[int, ...]
    group: int

    @property
    def modules(self):  # type: ignore[override]
        return (self.module,)

    @property
    def num_units(self):  # type: ignore[override]
        return math.prod(self.shape)

    @staticmethod
    def check(shape: Sequence[int], group: int) -> str | None:
        """A reason groups of ``group`` input features do not tile ``shape``, or None."""
        cols = math.prod(shape[1:])
        if cols % group:
            return (f"the weight has {cols} input features per row, not a multiple of the "
                    f"group size {group}; pick an M that divides it or exclude this layer")
        return None

    def unit_matrix(self, tensors):
        return tensors[self.module].reshape(-1, 1)

    def unit_sizes(self):
        return torch.ones(self.num_units, dtype=torch.long)

    def masks(self, keep):
        return {self.module: {"weight": keep.to(torch.float32).view(self.shape)}}

    def select(self, scores, sparsity):
        groups = scores.reshape(-1, self.group)
        counts = spread_counts(torch.full((groups.shape[0],), self.group), sparsity)
        order = torch.sort(groups, dim=1, stable=True).indices   # ties: lower index first
        ranks_kept = torch.arange(self.group).unsqueeze(0) >= counts.unsqueeze(1)
        keep = torch.empty_like(groups, dtype=torch.bool).scatter_(1, order, ranks_kept)
        return keep.reshape(-1)


@dataclass(frozen=True)
class BlockPool(Pool):
    module: str
    shape: tuple[int, ...]
    block: tuple[int, int]

    @property
    def modules(self):  # type: ignore[override]
        return (self.module,)

    @property
    def _grid(self) -> tuple[int, int, int, int]:
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        bm, bk = self.block
        return rows // bm, bm, cols // bk, bk

    @property
    def num_units(self):  # type: ignore[override]
        gm, _, gk, _ = self._grid
        return gm * gk

    @staticmethod
    def check(shape: Sequence[int], block: tuple[int, int]) -> str | None:
        """A reason the block size does not tile ``shape`` (canonical), or None."""
        rows, cols = shape[0], math.prod(shape[1:])
        if rows % block[0] or cols % block[1]:
            return (f"block_size {list(block)} does not tile the weight viewed as "
                    f"[out={rows}, in={cols}]; pick sizes that divide both")
        return None

    def unit_matrix(self, tensors):
        gm, bm, gk, bk = self._grid
        t = tensors[self.module].reshape(gm, bm, gk, bk)
        return t.permute(0, 2, 1, 3).reshape(gm * gk, bm * bk)

    def unit_sizes(self):
        return torch.full((self.num_units,), self.block[0] * self.block[1], dtype=torch.long)

    def masks(self, keep):
        gm, bm, gk, bk = self._grid
        grid = keep.to(torch.float32).view(gm, gk)
        full = grid.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
        return {self.module: {"weight": full.reshape(self.shape)}}


@dataclass(frozen=True)
class ChannelMember:
    """Unit ``u`` owns ``index[u]`` along canonical ``dim`` of ``module`` (shape
    ``shape``)."""

    module: str
    dim: int
    index: torch.Tensor  # [num_units, k] long
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ChannelPool(Pool):
    members: tuple[ChannelMember, ...]

    def __post_init__(self):
        counts = {m.index.shape[0] for m in self.members}
        if len(counts) != 1:
            raise ValueError(f"channel members disagree on the unit count: {counts}")

    @property
    def modules(self):  # type: ignore[override]
        return tuple(dict.fromkeys(m.module for m in self.members))

    @property
    def num_units(self):  # type: ignore[override]
        return self.members[0].index.shape[0]

    def unit_matrix(self, tensors):
        parts = []
        for m in self.members:
            t = tensors[m.module].movedim(m.dim, 0)
            parts.append(t[m.index.reshape(-1)].reshape(self.num_units, -1))
        return torch.cat(parts, dim=1)

    def unit_sizes(self):
        total = torch.zeros(self.num_units, dtype=torch.long)
        for m in self.members:
            total += m.index.shape[1] * math.prod(m.shape) // m.shape[m.dim]
        return total

    def masks(self, keep):
        out: CanonicalMasks = {}
        pruned = ~keep.to(torch.bool)
        for m in self.members:
            weight = torch.ones(m.shape)
            dropped = m.index[pruned].reshape(-1)
            weight.movedim(m.dim, 0)[dropped] = 0.0
            entry = {"weight": weight}
            if m.dim == 0:
                bias = torch.ones(m.shape[0])
                bias[dropped] = 0.0
                entry["bias"] = bias
            prev = out.get(m.module)
            out[m.module] = entry if prev is None else {
                k: prev.get(k, 1) * entry.get(k, 1) for k in set(prev) | set(entry)}
        return out


def channel_pool(module: str, shape: tuple[int, ...], dim: int) -> ChannelPool:
    """Rows (``dim=0``) or columns (``dim=1``) of one module as units."""
    index = torch.arange(shape[dim]).view(-1, 1)
    return ChannelPool((ChannelMember(module, dim, index, shape),))


def prune_lowest(scores: torch.Tensor, num_prune: int) -> torch.Tensor:
    """Keep mask (bool) pruning the ``num_prune`` lowest scores; ties: lower index first."""
    n = scores.numel()
    keep = torch.ones(n, dtype=torch.bool)
    if num_prune <= 0:
        return keep
    if num_prune >= n:
        return ~keep
    # same result as a stable sort, in linear time: everything below the k-th smallest
    # value, then the first of the units equal to it
    kth = torch.kthvalue(scores, num_prune).values
    below = scores < kth
    keep[below] = False
    ties = (scores == kth).nonzero().flatten()[: num_prune - int(below.sum())]
    keep[ties] = False
    return keep


def select_local(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    return prune_lowest(scores, units_to_prune(scores.numel(), sparsity))


def select_global(scores: Sequence[torch.Tensor], sizes: Sequence[torch.Tensor],
                  total_sparsity: float, caps: Sequence[float]) -> list[torch.Tensor]:
    """One ranking across pools. Returns a keep mask per pool (see module docstring)."""
    total = int(sum(int(s.sum()) for s in sizes))
    target = int(math.floor(total_sparsity * total + 0.5))
    keeps = [torch.ones(s.numel(), dtype=torch.bool) for s in scores]
    flat_scores, flat_sizes, owners, positions = [], [], [], []
    for p, (sc, sz, cap) in enumerate(zip(scores, sizes, caps)):
        limit = int(math.floor(cap * sc.numel() + 1e-9))
        eligible = (~prune_lowest(sc, limit)).nonzero().flatten()   # in unit order
        flat_scores.append(sc[eligible].double())
        flat_sizes.append(sz[eligible])
        owners.append(torch.full((eligible.numel(),), p, dtype=torch.long))
        positions.append(eligible)
    all_sizes = torch.cat(flat_sizes) if flat_sizes else torch.zeros(0, dtype=torch.long)
    _warn_if_capped(total_sparsity, target, int(all_sizes.sum()), total)
    if target == 0 or all_sizes.numel() == 0:
        return keeps
    all_scores = torch.cat(flat_scores)
    if bool((all_sizes == all_sizes[0]).all()):
        # equal units (fine, equal blocks or rows): the closest count, in linear time
        size = int(all_sizes[0])
        n = target // size
        if target - n * size > (n + 1) * size - target:
            n += 1
        chosen = (~prune_lowest(all_scores, min(n, all_scores.numel()))).nonzero().flatten()
    else:
        order = torch.sort(all_scores, stable=True).indices
        cum = torch.cumsum(all_sizes[order], 0)
        n = int((cum <= target).sum())            # the largest prefix not above target
        below = int(cum[n - 1]) if n > 0 else 0
        if n < cum.numel() and int(cum[n]) - target < target - below:
            n += 1                                # one more unit lands closer
        chosen = order[:n]
    all_owners, all_pos = torch.cat(owners)[chosen], torch.cat(positions)[chosen]
    for p in range(len(scores)):
        keeps[p][all_pos[all_owners == p]] = False
    return keeps


def _warn_if_capped(total_sparsity: float, target: int, prunable: int, total: int) -> None:
    """The caps (max_sparsity_per_layer) leave fewer prunable elements than the target asks."""
    if prunable < target:
        warnings.warn(f"total_sparsity={total_sparsity} is not reachable under "
                      f"max_sparsity_per_layer: the caps let {prunable} of {total} elements be "
                      f"pruned, a sparsity of {prunable / total:.4f}; pruning that much (raise "
                      "the caps or lower total_sparsity to silence this)", stacklevel=3)
