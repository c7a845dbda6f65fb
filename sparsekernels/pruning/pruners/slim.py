"""SlimPruner (network slimming, Liu et al. 2017): train with an L1 penalty on the
scaling factors of LayerNorm / BatchNorm for ``training_steps`` steps, then prune the
channels with the smallest ``|gamma|`` (weight and bias together). NNI 2.10 defaults:
``scale=0.0001``, ``mode='global'`` (entries use ``total_sparsity``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from sparsekernels.arch import layers
from sparsekernels.pruning.evaluator import Evaluator
from sparsekernels.pruning.pruners.data_driven import DataDrivenPruner


class SlimPruner(DataDrivenPruner):
    default_types = ("LayerNorm", "BatchNorm1d", "BatchNorm2d")
    supported_types = layers.NORM_TYPES
    granularities = ("fine", "out_channel")     # one unit per channel either way
    default_granularity = "out_channel"
    modes = ("global", "normal")

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 evaluator: Evaluator, training_steps: int, scale: float = 0.0001,
                 mode: str = "global"):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f"SlimPruner: scale must be a number >= 0, got {scale!r}")
        self.scale = float(scale)
        super().__init__(model, config_list, evaluator, training_steps, mode=mode)

    def _check_mode(self) -> None:
        if self.mode == "global":
            self._require_global_configs()

    def _prepare(self) -> None:
        modules = self._modules()
        gammas = [modules[n].weight for n in self._targets]

        def penalty(loss, batch):
            return loss + self.scale * sum(g.abs().sum() for g in gammas)

        self.evaluator.patch_loss(penalty)
        try:
            self.evaluator.train(max_steps=self.training_steps)
        finally:
            self.evaluator.revert_loss()

    def _element_scores(self, name, module):
        return module.weight.detach().abs()
