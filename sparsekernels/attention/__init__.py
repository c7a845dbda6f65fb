"""Block-sparse attention for Transformers: layouts (which query/key blocks are computed) and
the transformers integration (`enable_`, the "sparsekernels" attention implementation).

Importing this package registers attn_implementation="sparsekernels" with transformers when
transformers is installed, so `from_pretrained(..., attn_implementation="sparsekernels")` works
after `import sparsekernels.attention`; `enable_(model, layouts)` also attaches the layouts
(and, on transformers 4.x, patches BERT / RoBERTa / T5 attention modules, which that name
cannot reach); `disable_(model)` undoes it.
"""

from __future__ import annotations

import importlib.util

from sparsekernels.attention.integration import (
    IMPLEMENTATION,
    SparseAttentionConfig,
    attention_modules,
    bf16_projections_,
    disable_,
    enable_,
    register,
    set_fp32_precision_,
    sparsekernels_attention_forward,
)
from sparsekernels.attention.layouts import (
    AttentionMassCollector,
    block_attention_mass,
    calibrate_layouts,
    causal_layout,
    crop,
    dense_layout,
    density,
    global_window_layout,
    grid,
    head_mask_layout,
    random_layout,
    sliding_window_layout,
    topk_layout,
)

__all__ = [
    "AttentionMassCollector", "IMPLEMENTATION", "SparseAttentionConfig", "attention_modules",
    "bf16_projections_", "block_attention_mass", "calibrate_layouts", "causal_layout", "crop",
    "dense_layout", "density", "disable_", "enable_", "global_window_layout", "grid",
    "head_mask_layout", "random_layout", "register", "set_fp32_precision_",
    "sliding_window_layout", "sparsekernels_attention_forward", "topk_layout",
]

if importlib.util.find_spec("transformers") is not None:
    register()
