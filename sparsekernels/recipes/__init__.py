"""Recipes: a user's whole job, from one config file.

`transformer`: NNI's Transformer pruning guide as one run: fine-tune (the teacher),
movement-prune the attention and remove pruned heads, retrain with dynamic layer-wise
distillation while Taylor-pruning the FFN and the hidden dimension (speeding up after each
step), then evaluate, speed up, benchmark and report.
"""

from sparsekernels.recipes.config import RecipeConfig, load_config, preset

__all__ = ["RecipeConfig", "load_config", "preset"]
