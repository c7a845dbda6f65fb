"""Pruners that search per-layer sparsities (NNI 2.10): SimulatedAnnealingPruner and
AutoCompressPruner, plus the allocation layout they share with AMCPruner.

One job: choose how much of each layer to prune when a ``config_list`` entry only fixes
the total. Each entry's amount ``s`` (``sparsity`` or ``total_sparsity`` alike) is the
share of the weight elements of the layers it selects; a candidate gives each layer a
number of units (elements, blocks, channels at the entry's granularity) so that the
pruned elements sum to ``floor(s * N + 0.5)`` (within one unit when units differ in
size), each layer staying within ``max_sparsity_per_layer`` and below 1. The wrapped
one-shot pruner (``pruning_algorithm``) then prunes each layer to its count.

Simulated annealing (NNI): start from the uniform allocation; at temperature ``T`` add
uniform noise of width ``perturbation_magnitude * T / start_temperature`` to the per-layer
sparsities, rescale them so the total is unchanged (NNI's total-preserving perturbation),
evaluate (``evaluator.evaluate()``, higher is better; after the optional ``finetuner``),
accept a worse candidate with probability ``exp(-|delta| / T)``; ``T *= cool_down_rate``
until ``T <= stop_temperature``. Seeded by ``seed`` (default 0): same inputs, same search.

AutoCompress (Liu et al. 2020): ``total_iteration`` iterations on the schedule
``s_t = 1 - (1 - s)^(t/T)``; in each, simulated annealing (``sa_params``) chooses the
allocation for ``s_t`` keeping everything pruned so far, and ADMM (``admm_params``)
prunes to it.

Layers are single modules: granularity ``head`` and ``dependency_aware`` mode (units
spanning several modules) are refused with a ConfigError.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from sparsekernels.pruning.config import ConfigError, PruningConfig
from sparsekernels.formats.masks import Masks
from sparsekernels.pruning.pruners.scheduled import (
    IterativePruner, build_pruner, check_positive_int, pruned_units, restore_state_)
from sparsekernels.pruning.wrapper import apply_masks_


@dataclass(frozen=True)
class LayerSlot:
    """One prunable module: its unit count, elements per unit and cap (in units)."""

    name: str
    config: PruningConfig
    units: int
    unit_size: int
    max_units: int


class Layout:
    """The layers of each ``config_list`` entry, as a pruner's plan ranks them."""

    def __init__(self, pruner: IterativePruner):
        self.entries: dict[int, list[LayerSlot]] = {}
        for pool, config in pruner._plan:
            if len(pool.modules) != 1:
                raise ConfigError(
                    f"config_list[{config.index}]: {type(pruner).__name__} allocates "
                    f"sparsity per module, but units of {pool.modules} span several modules "
                    "(granularity 'head' or dependency_aware mode); use fine, block, "
                    "out_channel or in_channel")
            name = pool.modules[0]
            units = pool.num_units
            cap = min(int(math.floor(config.max_sparsity_for(name) * units + 1e-9)),
                      units - 1)
            self.entries.setdefault(config.index, []).append(LayerSlot(
                name, config, units, int(pool.unit_sizes()[0]), cap))
        self.slots = [s for slots in self.entries.values() for s in slots]
        for index, slots in self.entries.items():
            total = sum(s.units * s.unit_size for s in slots)
            room = sum(s.max_units * s.unit_size for s in slots)
            if room < self.target(index) - max(s.unit_size for s in slots) / 2:
                raise ConfigError(
                    f"config_list[{index}]: the per-layer caps allow at most "
                    f"{room / total:.4f} of the selected weights to be pruned, below the "
                    f"target {slots[0].config.amount}; raise max_sparsity_per_layer")

    def target(self, index: int) -> int:
        slots = self.entries[index]
        total = sum(s.units * s.unit_size for s in slots)
        return int(math.floor(slots[0].config.amount * total + 0.5))

    def config_list(self, counts: Mapping[str, int]) -> list[dict[str, Any]]:
        """One entry per module pruning exactly ``counts[name]`` units."""
        out = []
        for s in self.slots:
            entry: dict[str, Any] = {"op_names": [s.name], "sparsity": counts[s.name] / s.units,
                                     "granularity": s.config.granularity}
            if s.config.block_size is not None:
                entry["block_size"] = list(s.config.block_size)
            out.append(entry)
        return out

    def lower_bounds(self, pruner: IterativePruner, masks: Masks | None) -> dict[str, int]:
        """Units each layer has pruned already (0 without masks)."""
        if not masks:
            return {s.name: 0 for s in self.slots}
        modules = pruner._modules()
        return {pool.modules[0]: int(pruned_units(pool, masks, modules).sum())
                for pool, _ in pruner._plan}

    def allocate(self, sparsities: Mapping[str, float], lower: Mapping[str, int],
                 weights: Mapping[str, float] | None = None) -> dict[str, int]:
        """Unit counts proportional to ``sparsities`` (rescaled), meeting every entry's
        target. ``weights``: what one unit is worth toward the target relative to its
        elements (AMC's FLOPs); default 1."""
        counts: dict[str, int] = {}
        for index, slots in self.entries.items():
            w = [1.0 if weights is None else weights[s.name] for s in slots]
            sizes = [s.unit_size * wi for s, wi in zip(slots, w)]
            total = sum(s.units * size for s, size in zip(slots, sizes))
            target = self.target(index) * (total / sum(s.units * s.unit_size for s in slots))
            counts.update(zip((s.name for s in slots), allocate_units(
                [max(float(sparsities[s.name]), 0.0) for s in slots],
                [s.units for s in slots], sizes,
                [lower[s.name] for s in slots], [s.max_units for s in slots], target)))
        return counts


def allocate_units(shares: Sequence[float], units: Sequence[int], sizes: Sequence[float],
                   lo: Sequence[int], hi: Sequence[int], target: float) -> list[int]:
    """Integer counts ``k_i`` in ``[lo_i, hi_i]`` with ``sum(k_i * sizes_i)`` as close to
    ``target`` as the greedy rounding gets (within one unit), ``k_i`` proportional to
    ``shares_i * units_i`` where the bounds allow."""
    n = len(units)
    hi = [max(h, l) for h, l in zip(hi, lo)]
    shares = [s + 1e-9 for s in shares]

    def fill(lam):
        return [min(max(lam * shares[i] * units[i], lo[i]), hi[i]) for i in range(n)]

    def amount(x):
        return sum(xi * si for xi, si in zip(x, sizes))

    lam_lo, lam_hi = 0.0, max(hi[i] / (shares[i] * units[i]) for i in range(n)) + 1.0
    for _ in range(100):
        mid = 0.5 * (lam_lo + lam_hi)
        if amount(fill(mid)) < target:
            lam_lo = mid
        else:
            lam_hi = mid
    x = fill(lam_hi)
    k = [min(max(int(math.floor(xi + 1e-9)), lo[i]), hi[i]) for i, xi in enumerate(x)]
    rest = target - amount(k)
    for i in sorted(range(n), key=lambda i: x[i] - k[i], reverse=True):
        if k[i] < hi[i] and rest >= sizes[i] / 2:
            k[i] += 1
            rest -= sizes[i]
    while True:             # leftover: the layers with room whose unit fits best
        room = [i for i in range(n) if k[i] < hi[i] and rest >= sizes[i] / 2]
        if not room:
            return k
        i = min(room, key=lambda i: abs(rest - sizes[i]))
        k[i] += 1
        rest -= sizes[i]


class AllocationSearch(IterativePruner):
    """Shared by SA and AMC: evaluate a per-layer allocation on the model's weights."""

    def _setup_search(self) -> None:
        self.layout = Layout(self)
        self._start_state = None
        self.best_counts: dict[str, int] | None = None
        self.best_score = -math.inf
        self.best_masks: Masks | None = None

    def evaluate_counts(self, counts: Mapping[str, int]) -> tuple[float, Masks]:
        """Prune to ``counts`` (keeping what is pruned), finetune, score; the model's
        weights are restored afterwards. Recorded in ``history``."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.iteration += 1
        try:
            masks = self.masks_for(self.layout.config_list(counts))
            handle = apply_masks_(self.model, masks)
            try:
                result = self._record(masks)
            finally:
                handle.remove()
        finally:
            restore_state_(self.model, state)
        if result.score > self.best_score:
            self.best_score, self.best_counts, self.best_masks = result.score, dict(counts), masks
        return result.score, masks

    def _search(self) -> None:
        raise NotImplementedError

    def compute_masks(self) -> Masks:
        """Run the search; returns the best masks (the model's weights are unchanged)."""
        self.iteration = 0
        self.history.clear()
        self.best_score, self.best_counts, self.best_masks = -math.inf, None, None
        self._search()
        return self.best_masks

    def best_config_list(self) -> list[dict[str, Any]]:
        """The best allocation as a per-module ``config_list``."""
        if self.best_counts is None:
            raise RuntimeError("no search has run yet; call compress() or compute_masks()")
        return self.layout.config_list(self.best_counts)

    def compress(self) -> tuple[torch.nn.Module, Masks]:
        """Search, then load the best masks on the original weights and finetune them."""
        masks = self.compute_masks()
        self.load_masks(masks)
        if self.finetuner is not None:
            self.finetuner(self.model)
        masks = self.get_masks()
        if self.speedup:
            from sparsekernels.speedup.model_speedup import ModelSpeedup
            self.unwrap_model()
            ModelSpeedup(self.model, self.speedup_dummy_input, masks).speedup_model()
        return self.model, masks


def _number(owner: str, name: str, value: Any, low: float, high: float | None = None) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) \
        or not math.isfinite(value) or value <= low or (high is not None and value >= high)
    if bad:
        where = f"> {low}" if high is None else f"in ({low}, {high})"
        raise ValueError(f"{owner}: {name} must be a number {where}, got {value!r}")
    return float(value)


class SimulatedAnnealingPruner(AllocationSearch):
    """``SimulatedAnnealingPruner(model, config_list, evaluator, start_temperature=100,
    stop_temperature=20, cool_down_rate=0.9, perturbation_magnitude=0.35,
    pruning_algorithm='level', pruning_params=None, log_dir='.',
    keep_intermediate_result=False, finetuner=None, speedup=False, dummy_input=None,
    seed=0)``. ``history`` holds every candidate; ``best_config_list()`` the best
    allocation. Iterative use: ``masks = pruner.compute_masks()`` (runs the search, weights
    unchanged) then ``pruner.load_masks(masks)``."""

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 evaluator: Any, start_temperature: float = 100, stop_temperature: float = 20,
                 cool_down_rate: float = 0.9, perturbation_magnitude: float = 0.35,
                 pruning_algorithm: str = "level", pruning_params: Mapping[str, Any] | None = None,
                 log_dir: str | os.PathLike = ".", keep_intermediate_result: bool = False,
                 finetuner: Callable | None = None, speedup: bool = False,
                 dummy_input: Any = None, seed: int = 0):
        owner = type(self).__name__
        if evaluator is None or not callable(getattr(evaluator, "evaluate", None)):
            raise TypeError(f"{owner}: evaluator must have an evaluate() method (it scores "
                            f"each candidate), got {type(evaluator).__name__}")
        self.start_temperature = _number(owner, "start_temperature", start_temperature, 0)
        self.stop_temperature = _number(owner, "stop_temperature", stop_temperature, 0)
        if self.stop_temperature >= self.start_temperature:
            raise ValueError(f"{owner}: stop_temperature ({stop_temperature}) must be below "
                             f"start_temperature ({start_temperature})")
        self.cool_down_rate = _number(owner, "cool_down_rate", cool_down_rate, 0, 1)
        self.perturbation_magnitude = _number(owner, "perturbation_magnitude",
                                              perturbation_magnitude, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{owner}: seed must be an int, got {seed!r}")
        self.seed = seed
        steps, t = 0, self.start_temperature
        while t > self.stop_temperature:
            steps, t = steps + 1, t * self.cool_down_rate
        super().__init__(model, config_list, pruning_algorithm, steps + 1, log_dir,
                         keep_intermediate_result, finetuner, speedup, dummy_input, evaluator,
                         pruning_params)
        self._setup_search()

    def _search(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        lower = self.layout.lower_bounds(self, self.kept_masks())
        uniform = {s.name: s.config.amount for s in self.layout.slots}
        current = self.layout.allocate(uniform, lower)
        current_score, _ = self.evaluate_counts(current)
        temperature = self.start_temperature
        while temperature > self.stop_temperature:
            magnitude = self.perturbation_magnitude * temperature / self.start_temperature
            noise = (torch.rand(len(self.layout.slots), generator=gen, dtype=torch.float64)
                     * 2 - 1) * magnitude
            proposal = {s.name: min(max(current[s.name] / s.units + float(d), 0.0), 1.0)
                        for s, d in zip(self.layout.slots, noise)}
            candidate = self.layout.allocate(proposal, lower)
            score, _ = self.evaluate_counts(candidate)
            accept = math.exp(-abs(score - current_score) / temperature)
            if score > current_score or float(torch.rand((), generator=gen)) < accept:
                current, current_score = candidate, score
            temperature *= self.cool_down_rate


class AutoCompressPruner(IterativePruner):
    """``AutoCompressPruner(model, config_list, total_iteration, admm_params, sa_params,
    log_dir='.', keep_intermediate_result=False, finetuner=None, speedup=False,
    dummy_input=None, evaluator=None)``. ``admm_params``: ADMMPruner's arguments after
    ``config_list`` (``evaluator``, ``iterations``, ``training_steps`` ...);
    ``sa_params``: SimulatedAnnealingPruner's (``evaluator``, temperatures,
    ``pruning_algorithm``, ``seed`` ...). Iterative use: ``compute_masks()`` runs the next
    iteration, ``load_masks()`` applies it."""

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 total_iteration: int, admm_params: Mapping[str, Any],
                 sa_params: Mapping[str, Any], log_dir: str | os.PathLike = ".",
                 keep_intermediate_result: bool = False, finetuner: Callable | None = None,
                 speedup: bool = False, dummy_input: Any = None, evaluator: Any = None):
        owner = type(self).__name__
        for name, params in (("admm_params", admm_params), ("sa_params", sa_params)):
            if not isinstance(params, Mapping):
                raise TypeError(f"{owner}: {name} must be a dict of arguments, got "
                                f"{type(params).__name__}")
        check_positive_int(owner, "total_iteration", total_iteration)
        self.sa_params = dict(sa_params)
        # validates sa_params (and the allocation layout) before anything runs
        probe = build_pruner(owner, SimulatedAnnealingPruner, model, config_list,
                             self.sa_params)
        Layout(probe)
        super().__init__(model, config_list, "admm", total_iteration, log_dir,
                         keep_intermediate_result, finetuner, speedup, dummy_input, evaluator,
                         admm_params)

    def _amount_at(self, final, t):
        return 1.0 - (1.0 - final) ** (t / self.total_iteration)

    def compute_masks(self) -> Masks:
        if self.iteration >= self.total_iteration:
            raise RuntimeError(f"{type(self).__name__}: all {self.total_iteration} iterations "
                               "are done; build a new pruner to prune further")
        sa = SimulatedAnnealingPruner(self.model, self.config_list_at(self.iteration + 1),
                                      **self.sa_params)
        sa.prior_masks = self.kept_masks()
        sa.compute_masks()
        self.iteration += 1
        self.last_search = sa
        return self.masks_for(sa.best_config_list())


__all__ = ["AutoCompressPruner", "Layout", "SimulatedAnnealingPruner", "allocate_units"]
