"""Activation-based channel pruners (NNI 2.10): statistics of each output channel's
activation, gathered over ``training_steps`` training steps on inputs of any rank
(``[batch, seq, hidden]`` for Transformers: the channel is the last dim; Conv2d: dim 1).

* :class:`ActivationAPoZRankPruner` prunes the channels with the highest Average
  Percentage of Zeros. A value counts as zero when ``act(x) <= 0``: exactly ReLU's zeros,
  and for GELU (never exactly zero) the same region ``x <= 0``.
* :class:`ActivationMeanRankPruner` prunes the channels with the lowest mean activation.

``activation`` is ``"relu"``, ``"relu6"``, ``"gelu"`` or ``"identity"`` (NNI default
``"relu"``). Granularity: ``"out_channel"`` only (the default): the statistics are per
output channel.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from sparsekernels.arch import layers
from sparsekernels.pruning.distributed import all_reduce_sum_
from sparsekernels.pruning.evaluator import Evaluator
from sparsekernels.pruning.pruners.data_driven import DataDrivenPruner

ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "identity": lambda x: x}


class _ActivationPruner(DataDrivenPruner):
    granularities = ("out_channel",)

    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 evaluator: Evaluator, training_steps: int, activation: str = "relu",
                 mode: str = "normal", dummy_input: Any = None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of "
                             f"{', '.join(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        super().__init__(model, config_list, evaluator, training_steps, mode=mode,
                         dummy_input=dummy_input)

    def _prepare(self) -> None:
        modules = self._modules()
        act = ACTIVATIONS[self.activation]
        self._zeros: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        handles = []

        def hook(module, args, output, name):
            y = act(output.detach().double())
            dim = 1 if layers.type_name(module).startswith("Conv2d") and y.dim() == 4 \
                else y.dim() - 1
            y = y.movedim(dim, -1).reshape(-1, y.shape[dim]).cpu()
            self._zeros[name] = self._zeros.get(name, 0) + (y <= 0).sum(0).double()
            self._sums[name] = self._sums.get(name, 0) + y.sum(0)
            self._counts[name] = self._counts.get(name, 0) + y.shape[0]

        for name in self._targets:
            handles.append(modules[name].register_forward_hook(
                lambda m, a, o, name=name: hook(m, a, o, name)))
        try:
            self.evaluator.train(max_steps=self.training_steps)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self._targets if n not in self._counts]
        if missing:
            raise RuntimeError(f"{type(self).__name__}: {missing[0]!r} never ran during "
                               "training, so it has no activation statistics")
        # under DDP each rank saw its own batches: add the statistics of every rank
        names = sorted(self._counts)
        counts = torch.tensor([float(self._counts[n]) for n in names], dtype=torch.float64)
        all_reduce_sum_([self._zeros[n] for n in names] + [self._sums[n] for n in names] + [counts])
        self._counts = {n: float(c) for n, c in zip(names, counts.tolist())}

    def _channel_scores(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _element_scores(self, name, module):
        shape = layers.canonical_shape(module)
        rest = math.prod(shape[1:])
        score = self._channel_scores(name) / rest
        return score.view(-1, *([1] * (len(shape) - 1))).expand(shape)


class ActivationAPoZRankPruner(_ActivationPruner):
    def _channel_scores(self, name):
        return 1.0 - self._zeros[name] / self._counts[name]


class ActivationMeanRankPruner(_ActivationPruner):
    def _channel_scores(self, name):
        return self._sums[name] / self._counts[name]
