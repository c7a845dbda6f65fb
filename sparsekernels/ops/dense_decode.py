"""The dense Linear at decode rows: a direct entry of the extension, not an op.

sparsekernels._C.dense_linear_inference(x, weight, bias, max_rows) runs y = x W^T + b for an
nn.Linear's row-major weight on the block-sparse dot path (csrc/cpu/dense_decode.cpp), which
reads the weight as one [16, k] block per 16 outputs (a view: nothing copied, a tied weight
stays tied). It returns None for a call it does not take. Which calls go there is the
router's (ops.router.dense_decode_rows); nn.DecodeLinear is the module that calls it.
"""

from __future__ import annotations

from sparsekernels.ops import _ext


def direct_dense_linear():
    """`f(x, weight, bias, max_rows)`, or None when the extension lacks it. The caller checks
    that no gradient is needed and that no mode is active first."""
    return _ext.direct("dense_linear_inference")
