"""MovementPruner: learned importance scores that follow how weights move in training
(Sanh et al., 2020; NNI 2.10's names and defaults).

Each pruned weight W gets a score S (same shape, starting at 0). The forward uses
W * M, where M is the current mask, and a straight-through estimator gives S the gradient
dL/d(W * M) * W, so a weight that training pushes toward zero loses score. The pruner's own
Adam steps the scores after every optimizer step of the user's training.

- hard mode: M keeps the top-scored units at the scheduled sparsity; the sparsity follows
  a cubic schedule from 0 at `warm_up_step` to the config's target at
  `cool_down_beginning_step`, then stays there.
- soft mode: M keeps units whose score is >= 0 (all at first) and the loss gets
  `regular_scale * schedule * mean(sigmoid(S))`, which pushes unimportant scores below 0;
  the sparsity follows from regular_scale, capped by the config's sparsity (the units
  with the lowest scores go first).
- sparse_granularity: "finegrained" (elements), "auto" (attention projections in whole
  heads, FFN layers by rows when they expand the width and by columns when they reduce it),
  or "block" (blocks of `block_size`, the layout SparseLinear runs as is).

Under DDP, score gradients are averaged across ranks so every rank keeps the same scores.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
from torch.func import functional_call

from sparsekernels.arch import find_attention, layers
from sparsekernels.pruning.config import parse_config_list, select_targets
from sparsekernels.pruning.distributed import all_reduce_mean_
from sparsekernels.pruning.evaluator import Evaluator
from sparsekernels.pruning.granularity import select_local
from sparsekernels.formats.masks import Masks
from sparsekernels.pruning.pruners.base import Pruner

MODES = ("hard", "soft")
GRANULARITIES = ("finegrained", "auto", "block")


def cubic_schedule(step: int, warm_up_step: int, cool_down_beginning_step: int) -> float:
    """Fraction of the target sparsity at `step`: 0 before warm-up, then 1 - (1 - p)^3."""
    if step < warm_up_step:
        return 0.0
    if step >= cool_down_beginning_step:
        return 1.0
    progress = (step - warm_up_step) / (cool_down_beginning_step - warm_up_step)
    return 1.0 - (1.0 - progress) ** 3


class MovementPruner(Pruner):
    """``MovementPruner(model, config_list, evaluator, warm_up_step,
    cool_down_beginning_step, training_epochs=None, training_steps=None,
    regular_scale=None, movement_mode='hard', sparse_granularity='finegrained')``."""

    modes = ("normal",)
    default_granularity = "fine"

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 evaluator: Evaluator, warm_up_step: int, cool_down_beginning_step: int,
                 training_epochs: int | None = None, training_steps: int | None = None,
                 regular_scale: float | None = None, movement_mode: str = "hard",
                 sparse_granularity: str = "finegrained", block_size=(32, 32),
                 score_lr: float = 1e-2):
        name = type(self).__name__
        if not isinstance(evaluator, Evaluator):
            raise TypeError(f"{name}: evaluator must be a TorchEvaluator or TransformersEvaluator, "
                            f"got {type(evaluator).__name__}")
        for arg, value in (("warm_up_step", warm_up_step),
                           ("cool_down_beginning_step", cool_down_beginning_step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {arg} must be a non-negative int, got {value!r}")
        if cool_down_beginning_step <= warm_up_step:
            raise ValueError(f"{name}: cool_down_beginning_step ({cool_down_beginning_step}) must "
                             f"be after warm_up_step ({warm_up_step})")
        if training_steps is None and training_epochs is None:
            raise ValueError(f"{name}: give training_steps or training_epochs")
        if training_steps is not None and training_steps < cool_down_beginning_step:
            raise ValueError(f"{name}: training_steps ({training_steps}) ends before "
                             f"cool_down_beginning_step ({cool_down_beginning_step}): the "
                             "target sparsity would never be reached")
        if movement_mode not in MODES:
            raise ValueError(f"{name}: movement_mode must be one of {MODES}, got {movement_mode!r}")
        if sparse_granularity not in GRANULARITIES:
            raise ValueError(f"{name}: sparse_granularity must be one of {GRANULARITIES}, got "
                             f"{sparse_granularity!r}")
        if regular_scale is not None and regular_scale < 0:
            raise ValueError(f"{name}: regular_scale must be >= 0, got {regular_scale}")
        self.evaluator = evaluator
        self.warm_up_step = warm_up_step
        self.cool_down_beginning_step = cool_down_beginning_step
        self.training_epochs = training_epochs
        self.training_steps = training_steps
        self.movement_mode = movement_mode
        self.regular_scale = 1.0 if regular_scale is None else float(regular_scale)
        self.sparse_granularity = sparse_granularity
        self.score_lr = score_lr
        config_list = self._granular_config(model, config_list, sparse_granularity, block_size)
        super().__init__(model, config_list)
        evaluator.bind_model(model)
        self.scores: dict[str, torch.Tensor] = {}
        self.step = 0
        self.history: list[float] = []  # scheduled fraction of the target after each step
        self._score_optimizer: torch.optim.Optimizer | None = None  # while compress() trains
        self._resume: dict | None = None  # from load_state_dict, for the next compress()

    # -- configuration ---------------------------------------------------------------------
    def _granular_config(self, model, config_list, sparse_granularity, block_size):
        """Turn sparse_granularity into per-entry (or per-module) granularities."""
        entries = [dict(e) for e in config_list]
        if sparse_granularity == "finegrained":
            return entries
        if sparse_granularity == "block":
            for e in entries:
                if not e.get("exclude"):
                    e.setdefault("granularity", "block")
                    e.setdefault("block_size", list(block_size))
            return entries
        # auto: one entry per selected module, appended so it wins (NNI: later entries win)
        configs = parse_config_list(entries)
        targets = select_targets(model, configs, self.default_types, self.supported_types)
        projections = {p for b in find_attention(model) for p in b.projections}
        modules = dict(model.named_modules())
        for name, config in targets.items():
            if name in projections:
                granularity = "head"
            else:
                out_f, in_f = layers.canonical_shape(modules[name])[:2]
                granularity = "out_channel" if out_f >= in_f else "in_channel"
            entry = {"op_names": [name], "granularity": granularity}
            if config.is_global:
                entry["total_sparsity"] = config.total_sparsity
            else:
                entry["sparsity"] = config.sparsity
            entries.append(entry)
        return entries

    # -- interrupted training ---------------------------------------------------------------
    def _score_names(self) -> list[str]:
        return sorted({n for pool, _ in self._plan for n in pool.modules})

    def state_dict(self) -> dict:
        """The training state (step, history, scores and their optimizer), taken from the
        training loop while compress() runs; with load_state_dict, a compress() that was
        interrupted continues where it stopped."""
        if self._score_optimizer is None:
            raise RuntimeError(f"{type(self).__name__}.state_dict: there is training state "
                               "only while compress() trains; call it from the training loop")
        return {"step": self.step, "history": list(self.history),
                "scores": {n: s.detach().clone() for n, s in self.scores.items()},
                "score_optimizer": self._score_optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next compress() continue from `state` (from state_dict()): it trains the
        remaining training_steps - state["step"] steps. The model and its optimizer must be
        restored by the caller, as they were when the state was taken."""
        name = type(self).__name__
        if self.training_steps is None:
            raise ValueError(f"{name}.load_state_dict: resuming needs training_steps (this "
                             "pruner counts epochs)")
        step = state.get("step") if isinstance(state, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.training_steps:
            raise ValueError(f"{name}.load_state_dict: step must be an int in [0, "
                             f"{self.training_steps}], got {step!r}")
        modules = self._modules()
        names = self._score_names()
        scores = state.get("scores") or {}
        if sorted(scores) != names:
            raise ValueError(f"{name}.load_state_dict: the state scores {sorted(scores)[:3]}..., "
                             f"this pruner's config selects {names[:3]}...; load the state of "
                             "the same model and config_list")
        for n in names:
            if tuple(scores[n].shape) != tuple(modules[n].weight.shape):
                raise ValueError(f"{name}.load_state_dict: scores of {n} have shape "
                                 f"{tuple(scores[n].shape)}, the weight {tuple(modules[n].weight.shape)}")
        self._resume = dict(state)

    # -- training ---------------------------------------------------------------------------
    def _masks_at(self, fraction: float) -> Masks:
        """Masks from the current scores at `fraction` of every entry's target."""
        saved = self._plan
        self._plan = [(pool, replace(
            cfg, sparsity=None if cfg.sparsity is None else cfg.sparsity * fraction,
            total_sparsity=None if cfg.total_sparsity is None else cfg.total_sparsity * fraction))
            for pool, cfg in saved]
        try:
            return self.compute_masks()
        finally:
            self._plan = saved

    def _soft_masks(self) -> Masks:
        keeps = []
        tensors = {n: layers.to_canonical(self._modules()[n], s.detach()).cpu()
                   for n, s in self.scores.items()}
        from sparsekernels.formats.masks import merge_masks

        canonical: Masks = {}
        for pool, cfg in self._plan:
            unit = pool.unit_matrix(tensors).double().mean(dim=1)
            keep = unit >= 0
            # the entry's sparsity caps soft pruning: with Adam the regulariser moves every
            # score at the score learning rate, so without a cap it can empty whole layers
            if (~keep).double().mean() > cfg.amount:
                keep = select_local(unit, cfg.amount)
            keeps.append(keep)
            canonical = merge_masks(canonical, pool.masks(keep))
        return self._finish_masks(canonical, self._modules())

    def _current(self) -> Masks:
        if self.movement_mode == "soft":
            return self._soft_masks()
        return self._masks_at(cubic_schedule(self.step, self.warm_up_step,
                                             self.cool_down_beginning_step))

    def _prepare(self) -> None:
        modules = self._modules()
        names = self._score_names()
        self.scores = {n: torch.zeros_like(modules[n].weight, dtype=torch.float32,
                                           requires_grad=True) for n in names}
        optimizer = torch.optim.Adam(self.scores.values(), lr=self.score_lr)
        masks = {n: torch.ones_like(modules[n].weight) for n in names}
        steps = self.training_steps
        if self._resume is not None:  # continue an interrupted compress()
            state, self._resume = self._resume, None
            with torch.no_grad():
                for n, s in self.scores.items():
                    s.copy_(state["scores"][n])
            optimizer.load_state_dict(state["score_optimizer"])
            self.step, self.history = state["step"], list(state["history"])
            current = self._current()
            for n in names:
                masks[n] = current[n]["weight"].to(masks[n])
            steps = self.training_steps - self.step
        restore = {n: self._patch_forward(modules[n], n, masks) for n in names}

        def after_step():
            grads = [s.grad for s in self.scores.values() if s.grad is not None]
            all_reduce_mean_(grads)  # same scores on every rank under DDP
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            current = self._current()
            for n in names:
                masks[n] = current[n]["weight"].to(masks[n])
            self.history.append(cubic_schedule(self.step, self.warm_up_step,
                                               self.cool_down_beginning_step))

        if self.movement_mode == "soft" and self.regular_scale > 0:
            def regularize(loss, batch):
                frac = cubic_schedule(self.step, self.warm_up_step, self.cool_down_beginning_step)
                reg = torch.cat([torch.sigmoid(s).flatten() for s in self.scores.values()]).mean()
                return loss + self.regular_scale * frac * reg.to(loss.device)

            self.evaluator.patch_loss(regularize)
        self.evaluator.patch_optimizer_step(after=[after_step])
        self._score_optimizer = optimizer
        try:
            if steps is None or steps > 0:
                self.evaluator.train(max_steps=steps, max_epochs=self.training_epochs)
        finally:
            self._score_optimizer = None
            self.evaluator.revert_optimizer_step()
            self.evaluator.revert_loss()
            for undo in restore.values():
                undo()

    def _patch_forward(self, module: torch.nn.Module, name: str, masks: dict):
        """Run `module` with weight * mask, the mask carrying the scores' straight-through
        gradient; parameter names and the module class stay unchanged."""
        original = module.forward
        score = self.scores[name]
        inside = [False]

        def forward(*args, **kwargs):
            if inside[0]:
                return original(*args, **kwargs)
            mask = masks[name]
            s = score.to(module.weight.dtype)
            weight = module.weight * (mask + s - s.detach())
            inside[0] = True
            try:
                return functional_call(module, {"weight": weight}, args, kwargs, strict=False)
            finally:
                inside[0] = False

        module.forward = forward
        return lambda: module.__dict__.pop("forward", None)

    # -- scoring ----------------------------------------------------------------------------
    def _element_scores(self, name, module):
        return layers.to_canonical(module, self.scores[name].detach())

    def compute_masks(self) -> Masks:
        if self.movement_mode == "soft" and self.scores and self._plan and getattr(self, "_final", False):
            return self._soft_masks()
        return super().compute_masks()

    def compress(self):
        self.unwrap_model()
        self._prepare()
        self._final = True
        try:
            masks = self.compute_masks()
        finally:
            self._final = False
        self.load_masks(masks)
        return self.model, self.get_masks()
