"""Base for pruners that need training data: they gather statistics through an
:class:`~sparsekernels.pruning.evaluator.Evaluator` for ``training_steps`` optimizer steps
before scoring."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from sparsekernels.pruning.config import ConfigError
from sparsekernels.pruning.evaluator import Evaluator
from sparsekernels.pruning.pruners.base import Pruner


class DataDrivenPruner(Pruner):
    def __init__(self, model: torch.nn.Module, config_list: Sequence[Mapping[str, Any]],
                 evaluator: Evaluator, training_steps: int, mode: str = "normal",
                 dummy_input: Any = None):
        if not isinstance(evaluator, Evaluator):
            raise TypeError(f"{type(self).__name__}: evaluator must be a TorchEvaluator or "
                            f"TransformersEvaluator, got {type(evaluator).__name__}")
        if isinstance(training_steps, bool) or not isinstance(training_steps, int) \
                or training_steps < 1:
            raise ValueError(f"{type(self).__name__}: training_steps must be a positive int, "
                             f"got {training_steps!r}")
        self.evaluator = evaluator
        self.training_steps = training_steps
        if dummy_input is None:
            dummy_input = evaluator.get_dummy_input()
        super().__init__(model, config_list, mode=mode, dummy_input=dummy_input)
        evaluator.bind_model(model)

    def _require_global_configs(self) -> None:
        """For ``mode='global'``: every entry must use ``total_sparsity``."""
        for name, config in self._targets.items():
            if not config.is_global:
                raise ConfigError(
                    f"config_list[{config.index}]: mode 'global' ranks layers together and "
                    f"needs 'total_sparsity' (selected {name!r} with 'sparsity'); use "
                    "'total_sparsity' or mode='normal'")
