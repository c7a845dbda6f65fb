"""Sparse matrix formats: the block-sparse (BSR) weight that the kernels run."""

from sparsekernels.formats.block_sparse import (
    BlockSparseTensor,
    InvalidIndexError,
    block_mask_from_mask,
    topk_block_mask,
    validate_index,
)

__all__ = ["BlockSparseTensor", "InvalidIndexError", "block_mask_from_mask",
           "topk_block_mask", "validate_index"]
