"""Custom ops (torch.library) and what decides which implementation runs them. The only
layer that touches the compiled extension or Triton (and only when an op runs, never at
import).

One module per op, named as the op: ops.bsr_linear defines sparsekernels::bsr_linear (and its
backward ops bsr_dsd / bsr_sdd), ops.bsr_ffn sparsekernels::bsr_ffn, ops.bsr_gated_ffn
sparsekernels::bsr_gated_ffn (their int8 forms: ops.bsr_linear_int8, ops.bsr_ffn_int8,
ops.bsr_gated_ffn_int8), ops.block_sparse_attention sparsekernels::block_sparse_attention,
ops.add_layer_norm sparsekernels::add_layer_norm (a post-norm block's residual add and
LayerNorm), ops.rms_norm sparsekernels::rms_norm;
ops.reference holds the pure-torch oracles, ops.triton the Triton kernels, ops.router the
choice between them, ops.limits what the kernels run.
The functional forms over BlockSparseTensor weights live above, in sparsekernels.formats.
"""

from __future__ import annotations

# importing an op's module registers the op (torch.ops.sparsekernels.<name>)
from sparsekernels.ops import (  # noqa: F401
    add_layer_norm, block_sparse_attention, bsr_ffn, bsr_ffn_int8, bsr_gated_ffn,
    bsr_gated_ffn_int8, bsr_linear, bsr_linear_int8, rms_norm)
from sparsekernels.ops.backend import Backend

__all__ = ["Backend"]
