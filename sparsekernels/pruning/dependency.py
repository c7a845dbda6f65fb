"""Dependency-aware pruning: one pool of units per set of coupled channels.

One job: turn the channel groups the model map traces (sparsekernels.arch.trace) into
ranking pools, so that every layer reading or writing a channel prunes it together.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from sparsekernels.arch import layers
from sparsekernels.arch.trace import trace
from sparsekernels.pruning.config import PruningConfig
from sparsekernels.pruning.granularity import ChannelMember, ChannelPool, Pool


def dependency_plan(model: torch.nn.Module, targets: Mapping[str, PruningConfig],
                    dummy_input: Any) -> list[tuple[Pool, PruningConfig]]:
    """One :class:`ChannelPool` per coupled space touched by an ``out_channel`` /
    ``in_channel`` target. Only selected layers get masks; a group's sparsity is the
    smallest requested by its selected members."""
    tracer, splits = trace(model, dummy_input)
    spaces = tracer.spaces
    modules = dict(model.named_modules())
    pools: dict[int, list[tuple[ChannelMember, PruningConfig]]] = {}
    for name, config in targets.items():
        kind = "out" if config.granularity == "out_channel" else "in"
        shape = layers.canonical_shape(modules[name])
        parts = splits.get((name, kind)) or [(tracer.layer_space[(name, kind)],
                                              torch.arange(shape[0 if kind == "out" else 1]))]
        for space, index in parts:
            member = ChannelMember(name, 0 if kind == "out" else 1, index.view(-1, 1), shape)
            pools.setdefault(spaces.find(space), []).append((member, config))
    plan = []
    for members in pools.values():
        config = min((c for _, c in members), key=lambda c: (c.amount, c.index))
        plan.append((ChannelPool(tuple(m for m, _ in members)), config))
    return plan
