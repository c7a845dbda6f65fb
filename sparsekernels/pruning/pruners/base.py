"""The pruner base class: validate, score units, choose, wrap.

One job: the flow every pruner shares. A subclass says which layers it prunes, which
granularities its criterion applies to (and its default one, NNI's: channel pruners prune
output channels unless the entry says otherwise), and how to score: ``_element_scores`` returns a
canonical weight-shaped importance per module, and ``reduce`` turns a unit's values into
one score (``"sum"`` or ``"fpgm"``). Data-driven pruners gather what they need in
``_prepare`` (training through an evaluator) before scoring.

Everything that can be refused (config, selection, granularity, block tiling, heads,
dependency tracing) is checked in ``__init__``, before the model is touched.
"""

from __future__ import annotations

import functools

import math
import os
from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_model

from sparsekernels.arch import find_attention, layers
from sparsekernels.pruning.config import (
    GRANULARITIES, ConfigError, PruningConfig, granularity_kind, parse_config_list, parse_nm,
    select_targets)
from sparsekernels.pruning.dependency import dependency_plan
from sparsekernels.pruning.distributed import is_main_process
from sparsekernels.pruning.granularity import (
    BlockPool, ChannelMember, ChannelPool, ElementPool, Pool, RowGroupPool, channel_pool,
    select_global)
from sparsekernels.formats.masks import (
    Masks, load_masks_file, mask_sparsity, masks_to, merge_masks, save_masks,
    validate_masks)
from sparsekernels.pruning.wrapper import MaskHandle, apply_masks_

PoolPlan = list[tuple[Pool, PruningConfig]]


def _head_pools(block, config: PruningConfig, modules) -> list[Pool]:
    """Head units of one attention block. "head": one pool whose units are heads, or under
    grouped-query attention key/value groups with their query heads (K, V, their cache and
    the Q rows and O columns that read them go together, and every layer stays a standard
    grouped-query layout: the default). "query_head": the same number of query heads in
    every group (one pool per group; K and V stay)."""
    def member(m, d, idx):
        return ChannelMember(m, d, idx, layers.canonical_shape(modules[m]))

    if config.granularity == "head" or block.group_size == 1:
        return [ChannelPool(tuple(member(*m) for m in block.head_members()))]
    if config.is_global:
        raise ConfigError(f"config_list[{config.index}]: granularity 'query_head' prunes the "
                          "same number of query heads in every key/value group, so it takes "
                          "'sparsity', not 'total_sparsity'")
    r = block.group_size
    return [ChannelPool(tuple(member(m, d, idx[g * r:(g + 1) * r])
                              for m, d, idx in block.query_head_members()))
            for g in range(block.num_kv_heads)]


class Pruner:
    """Base class. ``compress()`` returns ``(model, masks)`` as NNI does."""

    default_types: Sequence[str] = layers.DEFAULT_WEIGHT_TYPES
    supported_types: Sequence[str] = layers.WEIGHT_TYPES
    granularities: Sequence[str] = GRANULARITIES
    default_granularity: str = "out_channel"
    modes: Sequence[str] = ("normal", "dependency_aware")
    reduce: str = "sum"

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 mode: str = "normal", dummy_input: Any = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in self.modes:
            raise ValueError(f"{type(self).__name__}: mode must be one of "
                             f"{', '.join(map(repr, self.modes))}, got {mode!r}")
        if mode == "dependency_aware" and dummy_input is None:
            raise ValueError(f"{type(self).__name__}: mode 'dependency_aware' needs "
                             "dummy_input (a tensor, tuple or dict the model accepts) to "
                             "trace channel dependencies")
        self.model = model
        self.config_list = config_list
        self.mode = mode
        self.dummy_input = dummy_input
        self._configs = tuple(
            c if c.granularity is not None else replace(c, granularity=self.default_granularity)
            for c in parse_config_list(config_list))
        self._targets = select_targets(model, self._configs, self.default_types,
                                       self.supported_types)
        for name, config in self._targets.items():
            if granularity_kind(config.granularity) not in self.granularities:
                raise ConfigError(
                    f"config_list[{config.index}]: {type(self).__name__} does not support "
                    f"granularity {config.granularity!r} (selected {name!r}); use one of "
                    f"{', '.join(self.granularities)}")
        self._check_mode()
        self._plan = self._build_plan()
        self._masks: Masks | None = None
        self._handle: MaskHandle | None = None

    # ----------------------------------------------------------------- planning
    def _check_mode(self) -> None:
        """Subclasses refine which configs a mode accepts."""

    def _modules(self) -> dict[str, torch.nn.Module]:
        return dict(self.model.named_modules())

    @functools.cached_property
    def _rotary_qk(self) -> set[str]:
        """Query and key projections whose output dims rotary embeddings rotate in pairs."""
        return {n for site in find_attention(self.model) if site.rotary_dims
                for n in (site.q, site.k)}

    def _splits_rotary_heads(self, name: str, granularity: str) -> bool:
        """Output-channel pruning of a rotary query or key projection (single head dims)."""
        return granularity == "out_channel" and name in self._rotary_qk

    def _build_plan(self) -> PoolPlan:
        modules = self._modules()
        plan: PoolPlan = []
        heads: dict[str, list[tuple[str, PruningConfig]]] = {}
        channel: dict[str, PruningConfig] = {}
        blocks = None
        for name, config in self._targets.items():
            module = modules[name]
            g = config.granularity
            is_norm = layers.type_name(module) in layers.NORM_TYPES
            shape = tuple(module.weight.shape) if is_norm else layers.canonical_shape(module)
            if is_norm:
                plan.append((ElementPool(name, shape, prune_bias=True), config))
            elif g == "fine":
                plan.append((ElementPool(name, shape), config))
            elif parse_nm(g) is not None:
                group = parse_nm(g)[1]
                reason = ("N:M patterns need a 2-D weight [out, in]; this one is "
                          f"{list(shape)}" if len(shape) != 2 else RowGroupPool.check(shape, group))
                if reason:
                    raise ConfigError(f"config_list[{config.index}]: {name!r}: {reason}")
                plan.append((RowGroupPool(name, shape, group), config))
            elif g == "block":
                reason = BlockPool.check(shape, config.block_size)
                if reason:
                    raise ConfigError(f"config_list[{config.index}]: {name!r}: {reason}")
                plan.append((BlockPool(name, shape, config.block_size), config))
            elif g in ("head", "query_head"):
                if blocks is None:
                    blocks = find_attention(self.model)
                owner = next((b for b in blocks if name in b.projections), None)
                if owner is None:
                    raise ConfigError(
                        f"config_list[{config.index}]: granularity {g!r} selected {name!r}, "
                        "which is not a Q/K/V/output projection of an attention block; "
                        "narrow the selection (e.g. op_names_re) to attention projections")
                heads.setdefault(owner.name, []).append((name, config))
            elif self._splits_rotary_heads(name, g):
                raise ConfigError(
                    f"config_list[{config.index}]: granularity {g!r} on {name!r} would prune "
                    "single dimensions of attention heads, but rotary position embeddings rotate "
                    "a head's dimensions in pairs: prune whole heads (granularity 'head') or "
                    "leave the query and key projections out of this entry")
            elif self.mode == "dependency_aware":
                channel[name] = config
            else:
                plan.append((channel_pool(name, shape, 0 if g == "out_channel" else 1),
                             config))
        for block in blocks or ():
            chosen = heads.get(block.name)
            if not chosen:
                continue
            amounts = {(c.amount, c.is_global, c.granularity) for _, c in chosen}
            if len(amounts) > 1:
                raise ConfigError(
                    f"config_list[{chosen[-1][1].index}]: the projections of attention block "
                    f"{block.name!r} get different amounts or granularities {sorted(amounts)}; "
                    "heads span Q, K, V and the output projection, so give them one entry")
            config = chosen[-1][1]
            plan.extend((pool, config) for pool in _head_pools(block, config, modules))
        if channel:
            plan.extend(dependency_plan(self.model, channel, self.dummy_input))
        return plan

    # ------------------------------------------------------------------ scoring
    def _prepare(self) -> None:
        """Gather data (e.g. train through an evaluator) before scoring."""

    def _element_scores(self, name: str, module: torch.nn.Module) -> torch.Tensor:
        """Canonical weight-shaped importance of ``module`` (higher = keep)."""
        raise NotImplementedError

    def _unit_scores(self, pool: Pool, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = pool.unit_matrix(tensors).double()
        if self.reduce == "fpgm":
            return torch.cdist(x, x).sum(dim=1)
        return x.sum(dim=1)

    def compute_masks(self) -> Masks:
        """Score every pool and choose the units to prune; does not wrap the model."""
        modules = self._modules()
        names = {n for pool, _ in self._plan for n in pool.modules}
        tensors = {n: self._element_scores(n, modules[n]).detach().to("cpu") for n in names}
        keeps: list[torch.Tensor | None] = [None] * len(self._plan)
        global_groups: dict[int, list[int]] = {}
        for i, (pool, config) in enumerate(self._plan):
            if config.is_global:
                global_groups.setdefault(config.index, []).append(i)
            else:
                keeps[i] = pool.select(self._unit_scores(pool, tensors), config.sparsity)
        for idx in global_groups.values():
            config = self._plan[idx[0]][1]
            pools = [self._plan[i][0] for i in idx]
            chosen = select_global(
                [self._unit_scores(p, tensors) for p in pools], [p.unit_sizes() for p in pools],
                config.total_sparsity,
                [min(config.max_sparsity_for(m) for m in p.modules) for p in pools])
            for i, keep in zip(idx, chosen):
                keeps[i] = keep
        canonical: Masks = {}
        for (pool, _), keep in zip(self._plan, keeps):
            canonical = merge_masks(canonical, pool.masks(keep))
        return self._finish_masks(canonical, modules)

    def _finish_masks(self, canonical: Masks, modules: dict[str, torch.nn.Module]) -> Masks:
        """Canonical -> stored layout, ones for unpruned bias, tied params share one mask."""
        masks: Masks = {}
        for name, entry in canonical.items():
            module = modules[name]
            is_norm = layers.type_name(module) in layers.NORM_TYPES
            out = {"weight": entry["weight"] if is_norm
                   else layers.from_canonical(module, entry["weight"])}
            if layers.has_bias(module):
                out["bias"] = entry.get("bias", torch.ones(module.bias.shape))
            masks[name] = out
        by_param: dict[int, list[tuple[str, str]]] = {}
        for name, entry in masks.items():
            for pname in entry:
                by_param.setdefault(id(getattr(modules[name], pname)), []).append((name, pname))
        for users in by_param.values():
            if len(users) > 1:
                product = math.prod(masks[n][p] for n, p in users)
                for n, p in users:
                    masks[n][p] = product.clone()
        return masks_to(masks, self.model)

    # ---------------------------------------------------------------- public API
    def compress(self) -> tuple[torch.nn.Module, Masks]:
        """Compute masks, wrap the model with them; returns ``(model, masks)``."""
        self.unwrap_model()
        self._prepare()
        masks = self.compute_masks()
        self.load_masks(masks)
        return self.model, self.get_masks()

    def load_masks(self, masks: Masks | str | os.PathLike) -> None:
        """Wrap the model with given masks (a mask dict or a file from ``export_model``)."""
        if isinstance(masks, (str, os.PathLike)):
            masks = load_masks_file(masks)
        validate_masks(self.model, masks)
        self.unwrap_model()
        self._handle = apply_masks_(self.model, masks)
        self._masks = self._handle.masks

    def get_masks(self) -> Masks:
        if self._masks is None:
            raise RuntimeError("no masks yet; call compress() or load_masks() first")
        return {n: dict(e) for n, e in self._masks.items()}

    def unwrap_model(self) -> torch.nn.Module:
        """Detach the mask hooks; pruned weights stay zero. Returns the model."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self.model

    def export_model(self, model_path: str | os.PathLike,
                     masks_path: str | os.PathLike | None = None) -> None:
        """Save the masked model's state dict and the masks as safetensors files."""
        masks = self.get_masks()
        with torch.no_grad():
            modules = self._modules()
            for name, entry in masks.items():
                for pname, mask in entry.items():
                    getattr(modules[name], pname).mul_(mask)
        if not is_main_process():
            return  # under DDP every rank holds the same model and masks; rank 0 writes
        save_model(self.model, os.fspath(model_path))
        if masks_path is not None:
            save_masks(masks, masks_path)

    def show_pruned_weights(self) -> str:
        """A table of each masked module's weight shape and sparsity (also printed)."""
        masks = self.get_masks()
        rows = [f"{'module':<50} {'shape':<16} sparsity"]
        for name, entry in masks.items():
            w = entry["weight"]
            rows.append(f"{name:<50} {str(tuple(w.shape)):<16} {mask_sparsity(w):.4f}")
        text = "\n".join(rows)
        print(text)
        return text
