"""Pruning: NNI-compatible config_list, masks, pruners and evaluators.

Quick start::

    from sparsekernels.pruning import L1NormPruner
    pruner = L1NormPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5}])
    model, masks = pruner.compress()     # masks: {module: {"weight": 0/1, "bias": 0/1}}

Modules, one job each: ``config`` (config_list -> frozen PruningConfig, selection),
``masks`` (NNI mask dicts, safetensors save/load), ``layers`` (canonical [out, in] view of
Linear / Conv1D / Conv2d / Embedding), ``heads`` (attention blocks and head channels),
``granularity`` (units, rounding, local and global ranking), ``dependency`` (coupled
channels by tracing), ``wrapper`` (masks applied with parameter names unchanged),
``evaluator`` (TorchEvaluator, TransformersEvaluator) and ``pruners`` (the eight NNI 2.10
pruners on a shared base class).
"""

from sparsekernels.pruning.config import ConfigError, PruningConfig, parse_config_list
from sparsekernels.pruning.heads import AttentionBlock, find_attention_blocks
from sparsekernels.pruning.masks import (
    MaskError, Masks, load_masks_file, mask_sparsity, save_masks, total_sparsity)
from sparsekernels.pruning.dependency import (
    ChannelGroup, GroupMember, TracingError, find_channel_groups)
from sparsekernels.pruning.evaluator import Evaluator, TorchEvaluator, TransformersEvaluator
from sparsekernels.pruning.pruners import (
    ADMMPruner, AGPPruner, AMCPruner, AutoCompressPruner, LinearPruner, LotteryTicketPruner,
    SimulatedAnnealingPruner, ActivationAPoZRankPruner, ActivationMeanRankPruner, FPGMPruner, L1NormPruner,
    L2NormPruner, LevelPruner, MovementPruner, Pruner, SlimPruner, TaylorFOWeightPruner)
from sparsekernels.pruning.wrapper import MaskHandle, apply_masks_

__all__ = [
    "ADMMPruner", "AGPPruner", "AMCPruner", "AutoCompressPruner", "LinearPruner",
    "LotteryTicketPruner", "SimulatedAnnealingPruner", "ActivationAPoZRankPruner", "ActivationMeanRankPruner", "ChannelGroup", "Evaluator",
    "GroupMember", "SlimPruner", "TaylorFOWeightPruner", "TorchEvaluator", "TracingError",
    "TransformersEvaluator", "find_channel_groups",
    "AttentionBlock", "ConfigError", "FPGMPruner", "L1NormPruner", "L2NormPruner",
    "LevelPruner", "MaskError", "MovementPruner", "MaskHandle", "Masks", "Pruner", "PruningConfig",
    "apply_masks_", "find_attention_blocks", "load_masks_file", "mask_sparsity",
    "parse_config_list", "save_masks", "total_sparsity",
]
