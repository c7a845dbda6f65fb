"""TaylorFOWeightPruner: first-order Taylor importance ``(w * g)**2`` (Molchanov et al.)
accumulated at every optimizer step over ``training_steps`` steps (NNI 2.10)."""

from __future__ import annotations

import torch

from sparsekernels.arch import layers
from sparsekernels.pruning.pruners.data_driven import DataDrivenPruner


class TaylorFOWeightPruner(DataDrivenPruner):
    """``TaylorFOWeightPruner(model, config_list, evaluator, training_steps,
    mode='normal', dummy_input=None)``; ``mode`` is ``normal``, ``global`` (every entry
    uses ``total_sparsity``) or ``dependency_aware``. Every granularity applies."""

    modes = ("normal", "global", "dependency_aware")

    def _check_mode(self) -> None:
        if self.mode == "global":
            self._require_global_configs()

    def _prepare(self) -> None:
        modules = self._modules()
        names = sorted({n for pool, _ in self._plan for n in pool.modules})
        self._importance = {n: torch.zeros(modules[n].weight.shape, dtype=torch.float64)
                            for n in names}

        def accumulate():
            with torch.no_grad():
                for n in names:
                    w = modules[n].weight
                    if w.grad is not None:
                        self._importance[n] += (w.detach().double()
                                                * w.grad.detach().double()).square().cpu()

        self.evaluator.patch_optimizer_step(before=[accumulate])
        try:
            self.evaluator.train(max_steps=self.training_steps)
        finally:
            self.evaluator.revert_optimizer_step()

    def _element_scores(self, name, module):
        return layers.to_canonical(module, self._importance[name])
