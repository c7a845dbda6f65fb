"""The one-shot (calibration, no training) pruner base: layer by layer, as SparseGPT does.

One job: the flow Wanda and SparseGPT share. ``compress()`` runs the calibration batches
to the first transformer layer and keeps that layer's inputs; for each layer with selected
modules it gathers their input statistics (hooks, one forward of the layer per batch),
prunes them (a subclass's ``_prune_pool``, which zeroes the pruned weights in place and may
update the kept ones), then runs the pruned layer to make the next layer's inputs. Memory
stays near one layer's activations for the calibration set plus the model. Selected
modules outside the layer stack (a classifier, a pooler), or every module when
``sequential=False`` or the model has no layer stack, are pruned from statistics gathered
in one ordinary forward of the whole model, after the layers.

Config keys: those of every pruner (``sparsity`` per layer; ``total_sparsity`` is refused,
because a layer is pruned before the next one's statistics exist), the granularities of
the subclass, and ``owl``: outlier-weighted layerwise sparsity (Yin et al., 2023). With
``"owl": True`` (or ``{"lambda": 0.08, "threshold": 5.0}``) the entry's ``sparsity`` is
the mean over the transformer layers it selects; a dense pass first measures each layer's
outlier ratio ``D_l`` (the fraction of its Wanda scores ``|W| * ||X||`` above
``threshold`` times their mean, over the entry's modules in that layer), and layer ``l``
gets ``sparsity - (r_l - mean(r))`` with ``r = 2 * lambda * (D - min D) / (max D - min D)``:
layers with more outliers are pruned less. The amounts lie within ``sparsity +- 2 * lambda``
(checked up front to stay in [0, 1)); the entry's overall sparsity equals ``sparsity`` up to
each layer's rounding.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from sparsekernels.arch import layers
from sparsekernels.arch.inputs import run_model
from sparsekernels.formats.masks import Masks, merge_masks
from sparsekernels.pruning.config import ConfigError, PruningConfig
from sparsekernels.pruning.granularity import CanonicalMasks, Pool
from sparsekernels.pruning.pruners.base import Pruner
from sparsekernels.pruning.distributed import world_size
from sparsekernels.pruning.pruners.calibration import (
    PRUNABLE_TYPES, InputStatistics, LayerInput, calibration_mode, capture_layer_inputs,
    check_batches, collect_statistics, layer_output, run_layer, transformer_layers)
from sparsekernels.pruning.pruners.reconstruct import parse_reconstruct, reconstruct_layer

OWL_DEFAULTS = {"lambda": 0.08, "threshold": 5.0}


def _owl_params(owner: str, index: int, value: Any) -> tuple[float, float] | None:
    if value is False or value is None:
        return None
    if value is True:
        value = OWL_DEFAULTS
    if not isinstance(value, Mapping) or set(value) - set(OWL_DEFAULTS):
        raise ConfigError(f"config_list[{index}]: 'owl' must be True or a dict with keys "
                          f"{sorted(OWL_DEFAULTS)}, got {value!r} ({owner})")
    params = {**OWL_DEFAULTS, **value}
    lam, thr = params["lambda"], params["threshold"]
    for key, v in (("lambda", lam), ("threshold", thr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise ConfigError(f"config_list[{index}]: 'owl' {key} must be a non-negative "
                              f"number, got {v!r}")
    return float(lam), float(thr)


def split_owl(owner: str, config_list: Any) -> tuple[Any, dict[int, tuple[float, float]]]:
    """The config_list without ``owl`` keys, and ``{entry index: (lambda, threshold)}``."""
    if not isinstance(config_list, (list, tuple)):
        return config_list, {}      # the base class explains what a config_list is
    entries, owl = [], {}
    for i, entry in enumerate(config_list):
        if isinstance(entry, Mapping) and "owl" in entry:
            params = _owl_params(owner, i, entry["owl"])
            if params is not None:
                owl[i] = params
            entry = {k: v for k, v in entry.items() if k != "owl"}
        entries.append(entry)
    return entries, owl


class OneShotPruner(Pruner):
    """Base of :class:`WandaPruner` and :class:`SparseGPTPruner` (see module docstring).

    ``calibration_data``: an iterable of model inputs (tensors, tuples or dicts, as
    ``dummy_input`` is elsewhere), read once into a list; ``sequential=False`` gathers every
    layer's statistics from the unpruned model in one forward instead. ``reconstruct``:
    after pruning a transformer layer, train its kept weights on the calibration batches to
    give the dense model's output of that layer (``True``, a number of epochs or
    ``{"epochs": 4, "lr": 1e-3}``; :mod:`.reconstruct`); ``reconstruction_log`` then holds
    ``(layer, error before, error after)`` per layer. Modules outside the layer stack (a
    classifier) are pruned without it.
    """

    default_types = PRUNABLE_TYPES
    supported_types = PRUNABLE_TYPES
    default_granularity = "fine"
    modes = ("normal",)
    gram = False          # whether statistics include X^T X (SparseGPT's Hessian)

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 calibration_data: Any, *, sequential: bool = True, reconstruct: Any = None):
        owner = type(self).__name__
        self.reconstruct = parse_reconstruct(owner, reconstruct)
        if self.reconstruct is not None and not sequential:
            raise ValueError(f"{owner}: reconstruct trains each pruned layer on the inputs "
                             "the pruned layers before it give, so it needs sequential=True")
        if self.reconstruct is not None and world_size() > 1:
            raise ValueError(f"{owner}: reconstruct trains on this process's calibration "
                             "batches only, so ranks would end with different weights; run "
                             "the pruner on one rank and broadcast its state_dict")
        entries, self._owl = split_owl(owner, config_list)
        super().__init__(model, entries)
        self.config_list = config_list
        for name, config in self._targets.items():
            if config.is_global:
                raise ConfigError(
                    f"config_list[{config.index}]: {owner} prunes one layer before the next "
                    f"one's statistics exist, so it cannot rank units across layers "
                    f"('total_sparsity', selected {name!r}); use 'sparsity', optionally with "
                    "'owl': True for outlier-weighted amounts per layer")
            lam = self._owl.get(config.index, (None,))[0]
            if lam is not None:
                if config.granularity in (None, "fine", "block", "out_channel", "in_channel",
                                          "head", "query_head") \
                        and 2 * lam <= config.sparsity < 1 - 2 * lam:
                    continue
                raise ConfigError(
                    f"config_list[{config.index}]: 'owl' needs a free amount per layer and "
                    f"sparsity +- 2 * lambda within [0, 1); got granularity "
                    f"{config.granularity!r}, sparsity {config.sparsity}, lambda {lam}")
        self.calibration_data = check_batches(owner, calibration_data)
        self.sequential = bool(sequential)
        self._stack = transformer_layers(model) if self.sequential else None
        if self.reconstruct is not None and self._stack is None:
            raise ValueError(f"{owner}: reconstruct trains one transformer layer at a time, "
                             "and this model has no transformer layer stack; leave it out")
        self._by_layer = self._plan_by_layer()
        self._decided: CanonicalMasks | None = None
        # (layer index, mean squared error against the dense layer before, after) per
        # reconstructed layer, on the calibration batches
        self.reconstruction_log: list[tuple[int, float, float]] = []

    # ----------------------------------------------------------------- planning
    def _layer_index(self, name: str) -> int | None:
        if self._stack is None:
            return None
        prefix = f"{self._stack[0]}." if self._stack[0] else ""
        if not name.startswith(prefix):
            return None
        head = name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def _plan_by_layer(self) -> dict[int | None, list[tuple[Pool, PruningConfig]]]:
        by_layer: dict[int | None, list[tuple[Pool, PruningConfig]]] = {}
        for pool, config in self._plan:
            where = {self._layer_index(m) for m in pool.modules}
            if len(where) > 1:
                raise ConfigError(
                    f"config_list[{config.index}]: {list(pool.modules)} are pruned together "
                    "but lie in different transformer layers, which are pruned one at a "
                    "time; select them separately")
            by_layer.setdefault(where.pop(), []).append((pool, config))
        return by_layer

    # ----------------------------------------------------------------- pruning
    def _prune_pool(self, pool: Pool, sparsity: float, stats: InputStatistics,
                    modules: dict[str, torch.nn.Module]) -> CanonicalMasks:
        """Choose the pool's units, zero them in place (and update kept weights if the
        method does); returns the pool's canonical masks."""
        raise NotImplementedError

    def _prune_plan(self, plan, stats, modules, amounts) -> CanonicalMasks:
        out: CanonicalMasks = {}
        for pool, config in plan:
            sparsity = amounts.get(pool.modules[0], config.sparsity)
            out = merge_masks(out, self._prune_pool(pool, sparsity, stats, modules))
        return out

    @staticmethod
    def _zero_(modules: dict[str, torch.nn.Module], masks: CanonicalMasks) -> None:
        """Multiply the masked parameters by their (canonical) masks, in place."""
        for param, m in OneShotPruner._masked_params(modules, masks).items():
            param.data.mul_(m.to(device=param.device, dtype=param.dtype))

    @staticmethod
    def _masked_params(modules: dict[str, torch.nn.Module],
                       masks: CanonicalMasks) -> dict[torch.Tensor, torch.Tensor]:
        """Each pruned parameter with its mask in the parameter's own layout (a bias mask of
        a layer without bias has none)."""
        out = {}
        for name, entry in masks.items():
            module = modules[name]
            for pname, mask in entry.items():
                param = getattr(module, pname, None)
                if isinstance(param, torch.Tensor):
                    out[param] = layers.from_canonical(module, mask) if pname == "weight" \
                        else mask
        return out

    def _modules_of(self, plan) -> dict[str, torch.nn.Module]:
        modules = self._modules()
        return {n: modules[n] for pool, _ in plan for n in pool.modules}

    def _run(self) -> CanonicalMasks:
        modules = self._modules()
        batches = self.calibration_data
        masks: CanonicalMasks = {}
        inside = sorted(i for i in self._by_layer if i is not None)
        with calibration_mode(self.model):
            amounts = self._owl_amounts(inside) if self._owl else {}
            if inside:
                stack = self._stack[1]
                inputs = capture_layer_inputs(self.model, stack[0], batches)
                dense = inputs if self.reconstruct is not None else None  # the dense model's
                self.reconstruction_log = []
                for i in range(inside[-1] + 1):
                    layer, plan = stack[i], self._by_layer.get(i)
                    if dense is not None:
                        dense = run_layer(layer, dense)     # before the layer is pruned
                    if plan:
                        stats = collect_statistics(
                            self._modules_of(plan), self.gram,
                            (layer(x.hidden, *x.args, **x.kwargs) for x in inputs))
                        decided = self._prune_plan(plan, stats, modules, amounts)
                        masks = merge_masks(masks, decided)
                        del stats
                        if dense is not None:
                            before, after = reconstruct_layer(
                                layer, inputs, [d.hidden for d in dense],
                                self._masked_params(modules, decided), self.reconstruct)
                            self.reconstruction_log.append((i, before, after))
                    if i < inside[-1]:
                        inputs = run_layer(layer, inputs)
                del inputs, dense
            plan = self._by_layer.get(None)
            if plan:
                stats = collect_statistics(self._modules_of(plan), self.gram,
                                           (run_model(self.model, b) for b in batches))
                masks = merge_masks(masks, self._prune_plan(plan, stats, modules, amounts))
        return masks

    def _owl_amounts(self, inside: list[int]) -> dict[str, float]:
        """Per-module sparsity of the ``owl`` entries (a dense pass; module docstring)."""
        modules = self._modules()
        ratios: dict[int, dict[int, float]] = {}     # entry index -> layer -> D_l
        if inside:
            stack = self._stack[1]
            inputs = capture_layer_inputs(self.model, stack[0], self.calibration_data)
            for i in range(inside[-1] + 1):
                layer = stack[i]
                plan = [(p, c) for p, c in self._by_layer.get(i, []) if c.index in self._owl]
                outputs: list[LayerInput] = []

                def forwards(layer=layer, inputs=inputs, outputs=outputs):
                    for x in inputs:
                        out = layer(x.hidden, *x.args, **x.kwargs)
                        outputs.append(LayerInput(layer_output(out), x.args, x.kwargs))
                        yield

                if not plan:
                    inputs = run_layer(layer, inputs)
                    continue
                stats = collect_statistics(self._modules_of(plan), False, forwards())
                for index in {c.index for _, c in plan}:
                    scores = torch.cat([
                        wanda_scores(modules[n], stats.mean_square(n)).flatten()
                        for p, c in plan if c.index == index for n in p.modules])
                    threshold = self._owl[index][1] * scores.mean()
                    ratios.setdefault(index, {})[i] = float((scores > threshold).double().mean())
                inputs = outputs
            del inputs
        amounts: dict[str, float] = {}
        for pool, config in self._plan:
            per_layer = ratios.get(config.index)
            where = self._layer_index(pool.modules[0])
            if not per_layer or where not in per_layer:
                continue
            D = torch.tensor([per_layer[k] for k in sorted(per_layer)], dtype=torch.float64)
            span = float(D.max() - D.min())
            lam = self._owl[config.index][0]
            r = (D - D.min()) / span * 2 * lam if span > 0 else torch.zeros_like(D)
            shift = dict(zip(sorted(per_layer), (r - r.mean()).tolist()))
            for name in pool.modules:
                amounts[name] = config.sparsity - shift[where]
        return amounts

    # ---------------------------------------------------------------- public API
    def _prepare(self) -> None:
        self._decided = self._run()

    def compute_masks(self) -> Masks:
        """Runs the calibration (pruning the weights in place as it goes: one-shot pruning
        decides layer ``l + 1`` from the pruned layer ``l``) unless ``compress()`` did."""
        if self._decided is None:
            self._prepare()
        return self._finish_masks(self._decided, self._modules())


def wanda_scores(module: torch.nn.Module, mean_square: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` on the canonical weight (float64; the norm as an RMS)."""
    w = layers.to_canonical(module, module.weight.detach()).to(torch.float64)
    return w.abs() * mean_square.to(w.device).sqrt().unsqueeze(0)
