"""Modules that run sparse weights: drop-in replacements for their dense counterparts."""

from sparsekernels.nn.quantized_sparse_linear import QuantizedSparseLinear
from sparsekernels.nn.sparse_ffn import SparseFFN, fuse_ffn_, unfuse_ffn_
from sparsekernels.nn.sparse_linear import SparseLinear, sparsify_

__all__ = ["QuantizedSparseLinear", "SparseFFN", "SparseLinear", "fuse_ffn_", "sparsify_", "unfuse_ffn_"]
