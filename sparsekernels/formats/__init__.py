"""Sparse matrix formats: the block-sparse (BSR) weight that the kernels run."""

from sparsekernels.formats.block_sparse import (
    BlockSparseTensor,
    block_mask_from_mask,
    topk_block_mask,
)

__all__ = ["BlockSparseTensor", "block_mask_from_mask", "topk_block_mask"]
