"""Pruners that score weights alone: Level, L1Norm, L2Norm, FPGM (NNI 2.10 names).

One job: the four weight-magnitude criteria. Each unit's score is computed on the
canonical weight: Level and L1 sum ``|w|`` (the L1 norm of the unit), L2 sums ``w**2``
(the squared L2 norm, same ranking as the norm), FPGM sums the Euclidean distances from
the unit's weights to every other unit's weights in the same pool, so the units nearest
the geometric median score lowest and are pruned first.
"""

from __future__ import annotations

import torch

from sparsekernels.arch import layers
from sparsekernels.pruning.config import GRANULARITIES, NM
from sparsekernels.pruning.pruners.base import Pruner


def _canonical_weight(module: torch.nn.Module) -> torch.Tensor:
    return layers.to_canonical(module, module.weight.detach())


class LevelPruner(Pruner):
    """Prune the weights of smallest magnitude (``"fine"`` by default; also N:M patterns
    such as ``"2:4"``, on Linear / Conv1D weights)."""

    default_granularity = "fine"
    granularities = GRANULARITIES + (NM,)

    def _element_scores(self, name, module):
        return _canonical_weight(module).abs()


class L1NormPruner(Pruner):
    """Prune the units (rows by ``"out_channel"``) of smallest L1 norm."""

    def _element_scores(self, name, module):
        return _canonical_weight(module).abs()


class L2NormPruner(Pruner):
    """Prune the units of smallest L2 norm."""

    def _element_scores(self, name, module):
        return _canonical_weight(module).double().square()


class FPGMPruner(Pruner):
    """Prune the units nearest the geometric median of their pool (He et al., 2019).

    Needs units with more than one value: every granularity except ``"fine"``.
    """

    granularities = ("out_channel", "in_channel", "block", "head", "query_head")
    reduce = "fpgm"

    def _element_scores(self, name, module):
        return _canonical_weight(module)
