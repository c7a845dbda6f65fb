"""Reference block-sparse Linear: densify, then dense math. Simple on purpose (the oracle)."""

from __future__ import annotations

import torch


def bsr_to_dense(values: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor,
                 shape) -> torch.Tensor:
    """Scatter the blocks into a dense [N, K]; differentiable with respect to values."""
    n, k = int(shape[0]), int(shape[1])
    bm, bk = int(values.shape[1]), int(values.shape[2])
    grid = values.new_zeros(n // bm, k // bk, bm, bk)
    grid = grid.index_put((row_indices.long(), col_indices.long()), values)
    return grid.permute(0, 2, 1, 3).reshape(n, k)


def dense_to_blocks(dense: torch.Tensor, row_indices, col_indices, block_size) -> torch.Tensor:
    """Gather the blocks at (row, col) of a dense [N, K] -> [nnz, bm, bk]."""
    (n, k), (bm, bk) = dense.shape, block_size
    grid = dense.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)
    return grid[row_indices.long(), col_indices.long()]


def forward(x, values, row_indices, col_indices, out_features, bias=None):
    """x[..., K] @ W.T + bias, W the block-sparse [out_features, K]."""
    w = bsr_to_dense(values, row_indices, col_indices, (out_features, x.shape[-1]))
    y = x @ w.T
    return y + bias if bias is not None else y


def bsr_dsd(grad, values, row_indices, col_indices, in_features):
    """grad[T, N] @ W: dense x sparse -> dense [T, K] (the input gradient)."""
    w = bsr_to_dense(values, row_indices, col_indices, (grad.shape[-1], in_features))
    return grad @ w


def bsr_sdd(grad, x, row_indices, col_indices, block_size):
    """Blocks of grad[T, N].T @ x[T, K] at the stored positions (the weight gradient)."""
    return dense_to_blocks(grad.T @ x, row_indices, col_indices, block_size)
