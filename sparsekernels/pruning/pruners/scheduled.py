"""Iterative pruners (NNI 2.10): AGPPruner, LinearPruner, LotteryTicketPruner.

One job: run a one-shot pruner (chosen by name, ``pruning_params`` passed through) over
``total_iteration`` iterations with a sparsity schedule. Every ``config_list`` entry with
final amount ``s`` gets at iteration ``t`` (1..T):

* AGP:           ``s_t = s * (1 - (1 - t/T)**3)``
* Linear:        ``s_t = s * t/T``
* LotteryTicket: ``s_t = 1 - (1 - s)**(t/T)`` (each iteration prunes the same fraction
  of the weights still there), so every entry reaches its own ``s`` at ``t = T``.

Each iteration: the wrapped pruner computes masks for ``s_t`` with the units pruned so far
forced to stay pruned (masks only grow), the masks are loaded, then the optional
``finetuner(model)`` runs and ``evaluator.evaluate()`` scores the result (higher is
better). ``history`` records every iteration; ``get_best_result()`` gives the best-scoring
one (the last one without an evaluator). ``compress()`` returns the final model and masks,
which meet the targets. With ``speedup=True`` the final model is resized by
``ModelSpeedup`` (needs ``dummy_input``); intermediate iterations are not resized.
``keep_intermediate_result`` writes ``log_dir/iteration_<t>_masks.safetensors`` (rank 0
only under ``torch.distributed``).

Iterative use inside training: call ``masks = pruner.compute_masks()`` (the next
iteration's masks) and ``pruner.load_masks(masks)`` at the steps you choose;
``pruner.iteration`` counts the iterations done.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from sparsekernels.arch import layers
from sparsekernels.pruning.config import _SPARSITY_ALIASES
from sparsekernels.pruning.evaluator import Evaluator
from sparsekernels.formats.masks import Masks, mask_sparsity, merge_masks, save_masks
from sparsekernels.pruning.pruners.activation import (
    ActivationAPoZRankPruner, ActivationMeanRankPruner)
from sparsekernels.pruning.pruners.admm import ADMMPruner
from sparsekernels.pruning.pruners.base import Pruner
from sparsekernels.pruning.pruners.slim import SlimPruner
from sparsekernels.pruning.pruners.taylor import TaylorFOWeightPruner
from sparsekernels.pruning.pruners.weight import (
    FPGMPruner, L1NormPruner, L2NormPruner, LevelPruner)

PRUNING_ALGORITHMS: dict[str, type[Pruner]] = {
    "level": LevelPruner, "l1": L1NormPruner, "l2": L2NormPruner, "fpgm": FPGMPruner,
    "slim": SlimPruner, "apoz": ActivationAPoZRankPruner,
    "mean_activation": ActivationMeanRankPruner, "taylorfo": TaylorFOWeightPruner,
    "admm": ADMMPruner,
}
_AMOUNT_KEYS = _SPARSITY_ALIASES + ("total_sparsity",)


# ------------------------------------------------------------------ shared helpers
def pruner_class(owner: str, name: Any) -> type[Pruner]:
    if name not in PRUNING_ALGORITHMS:
        raise ValueError(f"{owner}: pruning_algorithm must be one of "
                         f"{', '.join(PRUNING_ALGORITHMS)}, got {name!r}")
    return PRUNING_ALGORITHMS[name]


def build_pruner(owner: str, cls: type[Pruner], model: torch.nn.Module,
                 config_list: Sequence[Mapping[str, Any]],
                 params: Mapping[str, Any]) -> Pruner:
    """``cls(model, config_list, **params)``, naming the parameters when they do not fit."""
    try:
        return cls(model, config_list, **params)
    except TypeError as exc:
        if "argument" not in str(exc):
            raise
        raise TypeError(f"{owner}: pruning_params {sorted(params)} do not fit "
                        f"{cls.__name__}: {exc}. Data-driven algorithms need e.g. "
                        "{'evaluator': ..., 'training_steps': ...}") from exc


def scale_config_list(config_list: Sequence[Mapping[str, Any]],
                      amount: Callable[[float], float]) -> list[dict[str, Any]]:
    """A copy of ``config_list`` with each entry's amount ``s`` replaced by ``amount(s)``."""
    out = []
    for entry in config_list:
        entry = dict(entry)
        for key in _AMOUNT_KEYS:
            if key in entry and isinstance(entry[key], (int, float)) \
                    and not isinstance(entry[key], bool):
                entry[key] = float(amount(float(entry[key])))
        out.append(entry)
    return out


def check_positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def is_writer() -> bool:
    """False on ranks other than 0 of an initialised process group."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def score_value(score: Any) -> float:
    """An evaluator's result as a float (NNI: a number, or a dict with ``'default'``)."""
    if isinstance(score, Mapping):
        if "default" not in score:
            raise ValueError(f"evaluator.evaluate() returned a dict without 'default' "
                             f"({sorted(score)}); return a number or {{'default': number}}")
        score = score["default"]
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        score = score.item()
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise TypeError(f"evaluator.evaluate() must return a number (higher is better) or "
                        f"{{'default': number}}, got {type(score).__name__}")
    return float(score)


def canonical_mask(module: torch.nn.Module, masks: Masks | None, name: str) -> torch.Tensor:
    """``masks[name]['weight']`` in the canonical layout on the CPU (ones if absent)."""
    if masks and name in masks:
        m = masks[name]["weight"].detach().to("cpu", torch.float32)
    else:
        m = torch.ones(module.weight.shape)
    return m if layers.type_name(module) in layers.NORM_TYPES \
        else layers.to_canonical(module, m)


def pruned_units(pool, masks: Masks | None, modules: Mapping[str, torch.nn.Module]):
    """Bool per unit of ``pool``: pruned entirely by ``masks``."""
    prev = {n: canonical_mask(modules[n], masks, n) for n in pool.modules}
    return (pool.unit_matrix(prev) == 0).all(dim=1)


def keep_pruned_(pruner: Pruner, masks: Masks | None) -> None:
    """Make ``pruner`` rank every unit that ``masks`` prune entirely below all others, so
    the masks it computes contain them (monotone masks across iterations)."""
    if not masks:
        return
    modules = pruner._modules()
    base = pruner._unit_scores

    def unit_scores(pool, tensors):
        scores = base(pool, tensors).clone()
        scores[pruned_units(pool, masks, modules)] = -math.inf
        return scores

    pruner._unit_scores = unit_scores


def restore_state_(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            if key in state:
                value.copy_(state[key])


@dataclass(frozen=True)
class IterationResult:
    """One iteration: its per-layer sparsities, masks, score and file (if written)."""

    iteration: int
    sparsity: Mapping[str, float]
    masks: Masks
    score: float | None
    masks_path: str | None


# ---------------------------------------------------------------- the base class
class IterativePruner(Pruner):
    """Shared machinery of the scheduled pruners (see module docstring)."""

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 pruning_algorithm: str, total_iteration: int, log_dir: str | os.PathLike = ".",
                 keep_intermediate_result: bool = False, finetuner: Callable | None = None,
                 speedup: bool = False, dummy_input: Any = None, evaluator: Any = None,
                 pruning_params: Mapping[str, Any] | None = None):
        owner = type(self).__name__
        self.total_iteration = check_positive_int(owner, "total_iteration", total_iteration)
        if finetuner is not None and not callable(finetuner):
            raise TypeError(f"{owner}: finetuner must be a callable finetuner(model), got "
                            f"{type(finetuner).__name__}")
        if speedup and dummy_input is None:
            raise ValueError(f"{owner}: speedup=True needs dummy_input (inputs the model "
                             "accepts) to trace the model")
        if evaluator is not None and not callable(getattr(evaluator, "evaluate", None)):
            raise TypeError(f"{owner}: evaluator must have an evaluate() method, got "
                            f"{type(evaluator).__name__}")
        why = evaluator.cannot_evaluate() if isinstance(evaluator, Evaluator) else None
        if why is not None:
            raise ValueError(f"{owner}: the evaluator scores each iteration, but {why} cannot "
                             "evaluate: give it one (e.g. TorchEvaluator(..., "
                             "evaluating_func=...)) or pass no evaluator (the last iteration "
                             "is then kept)")
        if pruning_params is not None and not isinstance(pruning_params, Mapping):
            raise TypeError(f"{owner}: pruning_params must be a dict of the wrapped pruner's "
                            f"arguments, got {type(pruning_params).__name__}")
        self._inner_cls = pruner_class(owner, pruning_algorithm)
        self._inner_params = dict(pruning_params or {})
        self.pruning_algorithm = pruning_algorithm
        # validates config_list and pruning_params against the wrapped pruner (no mutation)
        probe = build_pruner(owner, self._inner_cls, model, config_list, self._inner_params)
        for attr in ("default_types", "supported_types", "granularities",
                     "default_granularity", "modes"):
            setattr(self, attr, getattr(probe, attr))
        self._user_config_list = [dict(e) for e in config_list]
        super().__init__(model, [{k: v for k, v in e.items() if k != "rho"}
                                 for e in self._user_config_list],
                         mode=probe.mode, dummy_input=probe.dummy_input)
        self.log_dir = os.fspath(log_dir)
        self.keep_intermediate_result = bool(keep_intermediate_result)
        self.finetuner = finetuner
        self.speedup = bool(speedup)
        self.speedup_dummy_input = dummy_input
        self.evaluator = evaluator
        if isinstance(evaluator, Evaluator):
            evaluator.bind_model(self.model)  # NNI 3: the pruner binds its evaluator
        self.prior_masks: Masks | None = None
        self.iteration = 0
        self.history: list[IterationResult] = []

    # ---------------------------------------------------------------- schedule
    def _amount_at(self, final: float, t: int) -> float:
        raise NotImplementedError

    def config_list_at(self, t: int) -> list[dict[str, Any]]:
        """The wrapped pruner's ``config_list`` at iteration ``t`` (1..total_iteration)."""
        return scale_config_list(self._user_config_list, lambda s: self._amount_at(s, t))

    # ----------------------------------------------------------------- stepping
    def masks_for(self, config_list: Sequence[Mapping[str, Any]]) -> Masks:
        """Masks of the wrapped pruner for ``config_list``, keeping what is pruned."""
        inner = build_pruner(type(self).__name__, self._inner_cls, self.model, config_list,
                             self._inner_params)
        keep_pruned_(inner, self.kept_masks())
        inner._prepare()
        masks = inner.compute_masks()
        kept = self.kept_masks()
        return masks if kept is None else merge_masks(masks, kept)

    def kept_masks(self) -> Masks | None:
        """Masks whose pruned units every new mask keeps pruned (the loaded ones, else
        ``prior_masks``)."""
        return self._masks if self._masks is not None else self.prior_masks

    def compute_masks(self) -> Masks:
        """The next iteration's masks (does not load them)."""
        if self.iteration >= self.total_iteration:
            raise RuntimeError(f"{type(self).__name__}: all {self.total_iteration} iterations "
                               "are done; build a new pruner to prune further")
        self.iteration += 1
        return self.masks_for(self.config_list_at(self.iteration))

    def _after_pruning(self) -> None:
        """Hook between loading an iteration's masks and finetuning (LotteryTicket)."""

    def _record(self, masks: Masks) -> IterationResult:
        if self.finetuner is not None:
            self.finetuner(self.model)
        score = score_value(self.evaluator.evaluate()) if self.evaluator is not None else None
        path = None
        if self.keep_intermediate_result and is_writer():
            os.makedirs(self.log_dir, exist_ok=True)
            path = os.path.join(self.log_dir, f"iteration_{self.iteration}_masks.safetensors")
            save_masks(masks, path)
        result = IterationResult(self.iteration,
                                 {n: mask_sparsity(e["weight"]) for n, e in masks.items()},
                                 masks, score, path)
        self.history.append(result)
        return result

    def compress(self) -> tuple[torch.nn.Module, Masks]:
        """Run the remaining iterations; returns the final ``(model, masks)``."""
        while self.iteration < self.total_iteration:
            masks = self.compute_masks()
            self.load_masks(masks)
            self._after_pruning()
            self._record(masks)
        masks = self.get_masks()
        if self.speedup:
            from sparsekernels.speedup.model_speedup import ModelSpeedup
            self.unwrap_model()
            ModelSpeedup(self.model, self.speedup_dummy_input, masks).speedup_model()
        return self.model, masks

    def get_best_result(self) -> IterationResult:
        """The best-scoring iteration (the last one when there is no evaluator)."""
        if not self.history:
            raise RuntimeError("no iteration has run yet; call compress()")
        scored = [r for r in self.history if r.score is not None]
        if not scored:
            return self.history[-1]
        return max(scored, key=lambda r: r.score)


class AGPPruner(IterativePruner):
    """Automated gradual pruning (Zhu & Gupta 2017): ``s_t = s (1 - (1 - t/T)^3)``."""

    def _amount_at(self, final, t):
        return final * (1.0 - (1.0 - t / self.total_iteration) ** 3)


class LinearPruner(IterativePruner):
    """``s_t = s * t / T``."""

    def _amount_at(self, final, t):
        return final * t / self.total_iteration


class LotteryTicketPruner(IterativePruner):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019).

    ``s_t = 1 - (1 - s)^(t/T)``. With ``reset_weight`` (default), right after each
    iteration's pruning the kept weights are reset to their values when the pruner was
    built (pruned ones stay zero); the ``finetuner`` then retrains that ticket, and the
    next iteration prunes the retrained weights, as in the paper.
    """

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 pruning_algorithm: str, total_iteration: int, log_dir: str | os.PathLike = ".",
                 keep_intermediate_result: bool = False, finetuner: Callable | None = None,
                 speedup: bool = False, dummy_input: Any = None, evaluator: Any = None,
                 reset_weight: bool = True, pruning_params: Mapping[str, Any] | None = None):
        super().__init__(model, config_list, pruning_algorithm, total_iteration, log_dir,
                         keep_intermediate_result, finetuner, speedup, dummy_input, evaluator,
                         pruning_params)
        self.reset_weight = bool(reset_weight)
        self._initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _amount_at(self, final, t):
        return 1.0 - (1.0 - final) ** (t / self.total_iteration)

    def _after_pruning(self) -> None:
        if not self.reset_weight:
            return
        restore_state_(self.model, self._initial_state)
        masks = self.get_masks()
        modules = self._modules()
        with torch.no_grad():
            for name, entry in masks.items():
                for pname, mask in entry.items():
                    p = getattr(modules[name], pname)
                    p.mul_(mask.to(device=p.device, dtype=p.dtype))


__all__ = ["AGPPruner", "IterationResult", "IterativePruner", "LinearPruner",
           "LotteryTicketPruner", "PRUNING_ALGORITHMS"]
