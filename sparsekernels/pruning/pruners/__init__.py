"""The pruners (NNI 2.10 names, parameters and defaults)."""

from sparsekernels.pruning.pruners.activation import (
    ActivationAPoZRankPruner, ActivationMeanRankPruner)
from sparsekernels.pruning.pruners.base import Pruner
from sparsekernels.pruning.pruners.admm import ADMMPruner
from sparsekernels.pruning.pruners.amc import AMCPruner
from sparsekernels.pruning.pruners.data_driven import DataDrivenPruner
from sparsekernels.pruning.pruners.movement import MovementPruner
from sparsekernels.pruning.pruners.scheduled import AGPPruner, LinearPruner, LotteryTicketPruner
from sparsekernels.pruning.pruners.search import AutoCompressPruner, SimulatedAnnealingPruner
from sparsekernels.pruning.pruners.oneshot import OneShotPruner
from sparsekernels.pruning.pruners.slim import SlimPruner
from sparsekernels.pruning.pruners.sparsegpt import SparseGPTPruner
from sparsekernels.pruning.pruners.taylor import TaylorFOWeightPruner
from sparsekernels.pruning.pruners.wanda import WandaPruner
from sparsekernels.pruning.pruners.weight import (
    FPGMPruner, L1NormPruner, L2NormPruner, LevelPruner)

__all__ = ["ADMMPruner", "AGPPruner", "AMCPruner", "AutoCompressPruner", "LinearPruner",
           "LotteryTicketPruner", "SimulatedAnnealingPruner", "ActivationAPoZRankPruner", "ActivationMeanRankPruner", "DataDrivenPruner",
           "FPGMPruner", "L1NormPruner", "L2NormPruner", "LevelPruner", "MovementPruner", "OneShotPruner",
           "Pruner", "SlimPruner", "SparseGPTPruner", "TaylorFOWeightPruner", "WandaPruner"]
