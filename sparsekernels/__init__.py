"""sparsekernels: prune Transformers and make the pruned models fast.

Importing the package is cheap and safe: it never initialises CUDA, never imports
Triton and never needs the compiled extension. Heavy submodules load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it; resolved lazily by __getattr__
_EXPORTS = {
    "BlockSparseTensor": "sparsekernels.formats.block_sparse",
    "SparseFFN": "sparsekernels.nn.sparse_ffn",
    "SparseLinear": "sparsekernels.nn.sparse_linear",
    "fuse_ffn_": "sparsekernels.nn.sparse_ffn",
    "sparsify_": "sparsekernels.nn.sparse_linear",
    "sparse_linear": "sparsekernels.formats.functional",
    "sparse_ffn": "sparsekernels.formats.functional",
    "block_sparse_attention": "sparsekernels.ops.block_sparse_attention",
    "describe": "sparsekernels.arch.model_map",
    "Backend": "sparsekernels.ops.backend",
}
_SUBMODULES = {"ops", "formats", "arch", "nn", "pruning", "attention", "speedup", "distill"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"sparsekernels.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'sparsekernels' has no attribute {name!r}")


def __dir__():
    return __all__
