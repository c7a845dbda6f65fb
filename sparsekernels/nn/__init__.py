"""Modules that run sparse weights: drop-in replacements for their dense counterparts."""

from sparsekernels.nn.add_norm import fuse_add_norm_, unfuse_add_norm_
from sparsekernels.nn.decode_linear import DecodeLinear, decode_linears_, undo_decode_linears_
from sparsekernels.nn.quantized_sparse_linear import QuantizedSparseLinear
from sparsekernels.nn.rms_norm import rms_norms_, undo_rms_norms_
from sparsekernels.nn.sparse_ffn import SparseFFN, fuse_ffn_, unfuse_ffn_
from sparsekernels.nn.sparse_linear import SparseLinear, sparsify_

__all__ = ["DecodeLinear", "QuantizedSparseLinear", "SparseFFN", "SparseLinear", "decode_linears_",
           "fuse_add_norm_", "fuse_ffn_", "rms_norms_", "sparsify_", "undo_decode_linears_",
           "undo_rms_norms_", "unfuse_add_norm_", "unfuse_ffn_"]
