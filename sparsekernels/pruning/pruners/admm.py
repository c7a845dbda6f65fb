"""ADMMPruner (Zhang et al. 2018; NNI 2.10 name, parameters and defaults).

One job: prune by the alternating direction method of multipliers. With ``W`` a layer's
weight, ``Z`` its sparse copy and ``U`` the scaled dual variable, each of ``iterations``
rounds

1. trains ``loss + rho/2 * ||W - Z + U||^2`` (through ``evaluator.patch_loss``) for
   ``training_steps`` optimizer steps or ``training_epochs`` epochs,
2. sets ``Z`` to the Euclidean projection of ``W + U`` onto the target sparsity at the
   entry's granularity (keep the units of largest ``||W + U||_2``, zero the rest; a
   ``total_sparsity`` entry projects onto the global constraint),
3. updates ``U += W - Z``.

The masks are the support of the final ``Z``. ``rho`` is the constructor's, or a
``config_list`` entry's own ``'rho'`` for the layers it selects (NNI's per-entry key).
``granularity`` is NNI's ``"fine-grained"`` (default) or ``"coarse-grained"`` (output
channels); an entry's own ``'granularity'`` (``fine``, ``block``, ...) wins.

``compress()`` runs the rounds and loads the masks. Iterative use inside training:
``masks = pruner.compute_masks()`` at any step gives the support of the current ``Z``
(of the magnitudes of ``W`` before the first round); ``pruner.load_masks(masks)`` applies
it. AGPPruner / LinearPruner with ``pruning_algorithm='admm'`` run ADMM per iteration.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from sparsekernels.arch import layers
from sparsekernels.pruning.evaluator import Evaluator
from sparsekernels.pruning.pruners.base import Pruner

NNI_GRANULARITY = {"fine-grained": "fine", "coarse-grained": "out_channel"}


def _positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _rho(owner: str, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {where} must be a positive number, got {value!r}")
    return float(value)


class ADMMPruner(Pruner):
    """``ADMMPruner(model, config_list, evaluator, iterations, training_epochs=None,
    training_steps=None, granularity='fine-grained', rho=1e-4)``.

    After ``compress()``, ``pruner.Z`` and ``pruner.U`` hold the final auxiliary and dual
    variables (stored weight layout, CPU float64) by module name.
    """

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 evaluator: Evaluator, iterations: int, training_epochs: int | None = None,
                 training_steps: int | None = None, granularity: str = "fine-grained",
                 rho: float = 1e-4):
        owner = type(self).__name__
        if not isinstance(evaluator, Evaluator):
            raise TypeError(f"{owner}: evaluator must be a TorchEvaluator or "
                            f"TransformersEvaluator, got {type(evaluator).__name__}")
        self.iterations = _positive_int(owner, "iterations", iterations)
        self.training_epochs = _positive_int(owner, "training_epochs", training_epochs, True)
        self.training_steps = _positive_int(owner, "training_steps", training_steps, True)
        if (self.training_epochs is None) == (self.training_steps is None):
            raise ValueError(f"{owner}: set exactly one of training_steps and training_epochs "
                             "(how long to train between two ADMM updates)")
        if granularity not in NNI_GRANULARITY:
            raise ValueError(f"{owner}: granularity must be 'fine-grained' or "
                             f"'coarse-grained', got {granularity!r}; per-entry "
                             "'granularity' keys choose block, head or in_channel")
        self.default_granularity = NNI_GRANULARITY[granularity]
        self.rho = _rho(owner, "rho", rho)
        entries, self._entry_rho = [], {}
        if isinstance(config_list, (list, tuple)):
            for i, entry in enumerate(config_list):
                if isinstance(entry, Mapping) and "rho" in entry:
                    self._entry_rho[i] = _rho(owner, f"config_list[{i}]['rho']", entry["rho"])
                    entry = {k: v for k, v in entry.items() if k != "rho"}
                entries.append(entry)
            config_list = entries
        self.evaluator = evaluator
        super().__init__(model, config_list)
        evaluator.bind_model(model)
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self._scores: dict[str, torch.Tensor] | None = None

    def rho_for(self, name: str) -> float:
        """The rho of the entry that selects ``name`` (or the constructor's)."""
        return self._entry_rho.get(self._targets[name].index, self.rho)

    # ---------------------------------------------------------------- ADMM steps
    def _weights(self) -> dict[str, torch.nn.Parameter]:
        modules = self._modules()
        return {n: modules[n].weight for n in self._targets}

    def _project(self) -> dict[str, dict[str, torch.Tensor]]:
        """Z <- projection of W + U onto the target sparsity; returns the masks."""
        weights = self._weights()
        v = {n: w.detach().double().cpu() + self.U[n] for n, w in weights.items()}
        self._scores = {n: x.square() for n, x in v.items()}
        try:
            masks = super().compute_masks()
        finally:
            self._scores = None
        self.Z = {n: v[n] * masks[n]["weight"].double().cpu() for n in v}
        return masks

    def _train_with_penalty(self) -> None:
        weights = self._weights()
        rhos = {n: self.rho_for(n) for n in weights}

        def penalty(loss, batch):
            extra = 0.0
            for n, w in weights.items():
                target = (self.Z[n] - self.U[n]).to(device=w.device, dtype=w.dtype)
                extra = extra + 0.5 * rhos[n] * (w - target).square().sum()
            return loss + extra

        self.evaluator.patch_loss(penalty)
        try:
            self.evaluator.train(max_steps=self.training_steps, max_epochs=self.training_epochs)
        finally:
            self.evaluator.revert_loss()

    def _prepare(self) -> None:
        """Run the ADMM rounds; leaves the final ``Z`` and ``U``."""
        weights = self._weights()
        # NNI's start: Z = W (dense), U = 0; the first round trains near the weights
        self.Z = {n: w.detach().double().cpu().clone() for n, w in weights.items()}
        self.U = {n: torch.zeros(w.shape, dtype=torch.float64) for n, w in weights.items()}
        for _ in range(self.iterations):
            self._train_with_penalty()
            self._project()
            for n, w in weights.items():
                self.U[n] += w.detach().double().cpu() - self.Z[n]

    def _element_scores(self, name, module):
        if self._scores is not None:                      # inside a projection
            return layers.to_canonical(module, self._scores[name])
        if name in self.Z:                                # final masks: support of Z
            return layers.to_canonical(module, self.Z[name].square())
        return layers.to_canonical(module, module.weight.detach().double().square())
