"""Modules that run sparse weights: drop-in replacements for their dense counterparts."""

from sparsekernels.nn.sparse_linear import SparseLinear, sparsify_

__all__ = ["SparseLinear", "sparsify_"]
