"""Distillation for retraining pruned students (CoFi-style dynamic layer-wise distillation)."""

from sparsekernels.distill.layerwise import DistillConfig, DistillOutput, DynamicLayerwiseDistiller

__all__ = ["DistillConfig", "DistillOutput", "DynamicLayerwiseDistiller"]
