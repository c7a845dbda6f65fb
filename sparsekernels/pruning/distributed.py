"""Data-parallel helpers: keep pruning state identical on every rank, write files once.

Under torch.distributed (DDP launched by torchrun or accelerate), model gradients are
averaged by DDP, but state a pruner keeps outside the model (movement scores, activation
statistics) is not: these helpers average it. Without an initialised process group they
do nothing, so single-process code is unchanged.
"""

from __future__ import annotations

from typing import Iterable

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (or without distributed): the only rank that writes files."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors across ranks, in place."""
    if not is_distributed():
        return
    n = world_size()
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t.div_(n)


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum tensors across ranks, in place (statistics gathered on each rank's own data)."""
    if not is_distributed():
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s tensors to every rank, in place."""
    if not is_distributed():
        return
    for t in tensors:
        torch.distributed.broadcast(t, src)
