"""Optimal Brain Surgeon for one layer: SparseGPT's column sweep and group removals.

One job: given a canonical weight ``W [rows, cols]`` and the layer Hessian
``H = 2 X^T X / n`` of its inputs, choose what to prune and update the kept weights so the
layer's output on the calibration inputs changes least (Frantar & Alistarh, 2023).

Dampening adds ``percdamp * mean(diag H)`` to the diagonal (inputs that never fire get a
diagonal of 1 first). With ``H^-1 = U^T U`` (``U`` upper triangular), row ``i`` of ``U``
holds the OBS update for removing column ``i`` once columns ``< i`` are fixed, and
``U[i, i]^2`` is the inverse-Hessian diagonal the saliency ``w^2 / [H^-1]_ii`` needs.
:func:`sparsegpt_prune` sweeps the columns left to right in lazy batches of ``blocksize``
(updates inside a batch, one matmul to the columns after it). The mask is chosen by
pattern:

* ``fine``: at the start of each batch, the lowest ``w^2 / U_ii^2`` over the batch's
  rows and columns (rows get different amounts: adaptive per row); the batches' counts add
  up to exactly ``round(sparsity * rows * cols)``.
* ``nm``: at every group of ``M`` columns, the ``M - N`` lowest saliencies of each row.
* ``block`` ``[bm, bk]``: at every ``bk`` columns, the ``bm``-row blocks whose joint
  removal costs least: ``||W_S U_SS^-1||^2`` summed over the block's rows (the OBS error of
  removing all of ``S`` at once, which the sweep then performs exactly). How many blocks
  each group of ``bk`` columns loses is set for the whole layer first
  (:func:`block_group_counts`): the layer's cheapest blocks by that error on the dense
  weights, so a group of inputs that matters (an outlier feature) keeps its blocks rather
  than losing the layer's share like every other group.

For channels: :func:`row_energy` (a pruned output row cannot be reconstructed: its error is
its output energy ``w H w^T``) and :func:`column_group_errors` / :func:`remove_columns_`
(removing a set of input columns from every row with the joint OBS update).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from sparsekernels.formats.block_sparse import units_to_prune
from sparsekernels.pruning.granularity import spread_counts

PATTERNS = ("fine", "nm", "block")


@dataclass(frozen=True)
class ObsPattern:
    """What :func:`sparsegpt_prune` prunes: ``kind`` in PATTERNS, the sparsity, ``group``
    (M of an N:M pattern) and ``block`` ([bm, bk])."""

    kind: str
    sparsity: float
    group: int = 0
    block: tuple[int, int] = (0, 0)


def damped_hessian(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Float64 copy with dead inputs set to 1 and ``percdamp * mean(diag)`` added."""
    H = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag += percdamp * diag.mean()
    return H


def _cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"the layer Hessian is not positive definite after dampening with "
                         f"percdamp={percdamp}; raise percdamp or give more calibration data")
    return L


def damped_inverse(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``(H + damp I)^-1`` in float64."""
    return torch.cholesky_inverse(_cholesky(damped_hessian(hessian, percdamp), percdamp))


def inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper ``U`` (float64) with ``(H + damp I)^-1 = U^T U``."""
    return torch.linalg.cholesky(damped_inverse(hessian, percdamp), upper=True)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries of a 1-D tensor (on its device)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores, k, largest=False).indices] = True
    return mask


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """The column sweep is thousands of small ops: on CPU one thread runs them faster than
    several (no fork and join per op, which costs most when the cores are shared)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sweep_step(pattern: ObsPattern, blocksize: int) -> int:
    """The lazy batch width: ``blocksize`` rounded down to whole N:M groups / blocks."""
    unit = pattern.group if pattern.kind == "nm" else pattern.block[1] \
        if pattern.kind == "block" else 1
    return max(unit, blocksize // unit * unit)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: ObsPattern,
                    blocksize: int = 128, percdamp: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(updated weight, keep mask bool)`` for a canonical ``[rows, cols]`` weight (see
    module docstring), computed in float32 (float64 for a float64 weight). The input weight
    is not modified."""
    if pattern.kind not in PATTERNS:
        raise ValueError(f"pattern kind must be one of {PATTERNS}, got {pattern.kind!r}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    rows, cols = W.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"the Hessian is {tuple(hessian.shape)}, expected ({cols}, {cols})")
    U = inverse_cholesky(hessian, percdamp).to(device=W.device, dtype=dtype)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    step = sweep_step(pattern, blocksize)
    starts = list(range(0, cols, step))
    s = pattern.sparsity
    per_group, group_counts = 0, None
    if pattern.kind == "fine":
        batch_counts = spread_counts([rows * (min(i + step, cols) - i) for i in starts], s)
    elif pattern.kind == "nm":
        per_group = units_to_prune(pattern.group, s)
    else:
        bm, bk = pattern.block
        if rows % bm or cols % bk:
            raise ValueError(f"block {list(pattern.block)} does not tile [{rows}, {cols}]")
        group_counts = block_group_counts(W, U, pattern.block, s)
    for b, i1 in enumerate(starts):
        i2 = min(i1 + step, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        Err1 = torch.zeros_like(W1)
        if pattern.kind == "fine":
            score = (W1 / torch.diagonal(U1)).square().flatten()
            P1 = _lowest(score, int(batch_counts[b])).view_as(W1)
        with _one_thread(W.device):
            _sweep_batch(W1, U1, P1, Err1, pattern, i1, group_counts, per_group)
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = P1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, ~pruned


def block_group_counts(W: torch.Tensor, U: torch.Tensor, block: tuple[int, int],
                       sparsity: float) -> list[int]:
    """How many ``bm``-row blocks each group of ``bk`` columns of ``W`` loses: of all the
    layer's blocks, the ``units_to_prune(blocks, sparsity)`` of least OBS error
    ``||W_S U_SS^-1||^2`` (on these weights, before the sweep updates them), counted per
    group. The sweep then picks which blocks of a group on the updated weights."""
    bm, bk = block
    err = torch.stack([_block_errors(W[:, g0:g0 + bk], U[g0:g0 + bk, g0:g0 + bk], bm)
                       for g0 in range(0, W.shape[1], bk)], 1)   # [row blocks, col groups]
    k = units_to_prune(err.numel(), sparsity)
    return _lowest(err.flatten(), k).view_as(err).sum(0).tolist()


def _block_errors(Wg: torch.Tensor, Ugg: torch.Tensor, bm: int) -> torch.Tensor:
    """OBS error ``||W_S U_SS^-1||^2`` of removing each ``bm``-row block of one column group
    ``Wg`` (``Ugg``: the group's diagonal block of ``U``)."""
    Z = torch.linalg.solve_triangular(Ugg, Wg, upper=True, left=False)
    return Z.square().sum(1).view(-1, bm).sum(1)


def _sweep_batch(W1, U1, P1, Err1, pattern, i1, group_counts, per_group) -> None:
    """Columns of one lazy batch, left to right: choose the N:M / block masks where a
    group starts, remove the pruned weights, move their error onto the columns to the
    right within the batch (in place on W1, P1, Err1)."""
    d = torch.diagonal(U1)
    for i in range(W1.shape[1]):
        if pattern.kind == "nm" and i % pattern.group == 0 and per_group:
            g = slice(i, i + pattern.group)
            worst = torch.topk((W1[:, g] / d[g]).square(), per_group, dim=1,
                               largest=False).indices
            P1[:, g].scatter_(1, worst, True)
        elif pattern.kind == "block" and i % pattern.block[1] == 0:
            bm, bk = pattern.block
            k = group_counts[(i1 + i) // bk]
            if k:
                g = slice(i, i + bk)
                err = _block_errors(W1[:, g], U1[g, g], bm)
                P1[_lowest(err, k).repeat_interleave(bm), g] = True
        w = W1[:, i]
        q = w.masked_fill(P1[:, i], 0.0)
        err = (w - q) / d[i]
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
        W1[:, i] = q
        Err1[:, i] = err


def row_energy(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``w_r H w_r^T`` per row (float64): the output energy lost by pruning row ``r``."""
    W = weight.detach().to(torch.float64)
    return ((W @ hessian.to(device=W.device, dtype=torch.float64)) * W).sum(1)


def column_group_errors(weight: torch.Tensor, hinv: torch.Tensor,
                        index: torch.Tensor) -> torch.Tensor:
    """OBS error of removing the columns ``index[u]`` from every row, per unit ``u``:
    ``sum_r w_rS (Hinv_SS)^-1 w_rS^T`` (float64, ``[U]``)."""
    W = weight.detach().to(torch.float64)
    idx = index.to(W.device)
    A = hinv[idx.unsqueeze(2), idx.unsqueeze(1)]          # [U, k, k]
    Ws = W[:, idx].permute(1, 2, 0)                       # [U, k, rows]
    return (Ws * torch.linalg.solve(A, Ws)).sum((1, 2))


def remove_columns_(weight: torch.Tensor, hinv: torch.Tensor, columns: torch.Tensor) -> None:
    """Zero ``columns`` of a canonical weight in place and move their contribution onto the
    other columns (the joint OBS update ``W -= W_S (Hinv_SS)^-1 Hinv_S:``)."""
    if columns.numel() == 0:
        return
    cols = columns.to(weight.device)
    W = weight.to(torch.float64)
    delta = W[:, cols] @ torch.linalg.solve(hinv[cols][:, cols], hinv[cols])
    W -= delta
    W[:, cols] = 0.0
    weight.copy_(W.to(weight.dtype))
