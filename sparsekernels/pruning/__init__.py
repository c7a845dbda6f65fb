"""Pruning: NNI-compatible config_list, masks, pruners and evaluators.

Quick start::

    from sparsekernels.pruning import L1NormPruner
    pruner = L1NormPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5}])
    model, masks = pruner.compress()     # masks: {module: {"weight": 0/1, "bias": 0/1}}

Modules, one job each: ``config`` (config_list -> frozen PruningConfig, selection),
``masks`` (NNI mask dicts, safetensors save/load), ``granularity`` (units, rounding,
local and global ranking), ``dependency`` (one pool per set of coupled channels, from the
model map's traced channel groups), ``wrapper`` (masks applied with parameter names unchanged),
``evaluator`` (TorchEvaluator, TransformersEvaluator) and ``pruners`` (NNI 2.10's pruners
on a shared base class, and the one-shot LLM pruners WandaPruner and SparseGPTPruner, which
prune layer by layer from calibration batches).
"""

from sparsekernels.pruning.config import ConfigError, PruningConfig, parse_config_list
from sparsekernels.formats.masks import (
    MaskError, Masks, load_masks_file, mask_sparsity, save_masks, total_sparsity)
from sparsekernels.arch.trace import TracingError
from sparsekernels.pruning.evaluator import Evaluator, TorchEvaluator, TransformersEvaluator
from sparsekernels.pruning.pruners import (
    ADMMPruner, AGPPruner, AMCPruner, AutoCompressPruner, LinearPruner, LotteryTicketPruner,
    SimulatedAnnealingPruner, ActivationAPoZRankPruner, ActivationMeanRankPruner, FPGMPruner, L1NormPruner,
    L2NormPruner, LevelPruner, MovementPruner, Pruner, SlimPruner, SparseGPTPruner,
    TaylorFOWeightPruner, WandaPruner)
from sparsekernels.pruning.wrapper import MaskHandle, apply_masks_

__all__ = [
    "ADMMPruner", "AGPPruner", "AMCPruner", "AutoCompressPruner", "LinearPruner",
    "LotteryTicketPruner", "SimulatedAnnealingPruner", "ActivationAPoZRankPruner", "ActivationMeanRankPruner", "Evaluator",
    "SlimPruner", "TaylorFOWeightPruner", "TorchEvaluator", "TracingError",
    "TransformersEvaluator", "ConfigError", "FPGMPruner", "L1NormPruner", "L2NormPruner",
    "LevelPruner", "MaskError", "MovementPruner", "MaskHandle", "Masks", "Pruner", "PruningConfig",
    "apply_masks_", "load_masks_file", "mask_sparsity",
    "parse_config_list", "save_masks", "total_sparsity", "SparseGPTPruner", "WandaPruner",
]
