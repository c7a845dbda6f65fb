"""Custom ops (torch.library) and their thin Python wrappers. The only layer that touches
the compiled extension or Triton (and only when an op runs, never at import).

Each op's module has the op's name, so the wrapper function is bound here eagerly: after
this, `sparsekernels.ops.bsr_linear` is the function, not the module.
"""

from __future__ import annotations

import importlib.util

from sparsekernels.ops.backend import Backend
from sparsekernels.ops.bsr_linear import bsr_linear
from sparsekernels.ops.bsr_ffn import bsr_ffn
from sparsekernels.ops.bsr_gated_ffn import bsr_gated_ffn

__all__ = ["Backend", "bsr_ffn", "bsr_gated_ffn", "bsr_linear"]

if importlib.util.find_spec("sparsekernels.ops.block_sparse_attention") is not None:
    from sparsekernels.ops.block_sparse_attention import block_sparse_attention

    __all__.append("block_sparse_attention")
