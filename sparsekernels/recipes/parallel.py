"""Where the recipe runs: its device, and data parallelism under torchrun or accelerate.

Launched by `torchrun --nproc-per-node N -m sparsekernels prune CONFIG` (or `accelerate
launch`), every process runs the recipe on its own slice of each global batch: the
configured batch size stays the global one, DDP averages the gradients, and the pruners'
own state (movement scores, Taylor and activation statistics) is averaged by
sparsekernels.pruning.distributed, so masks and schedules are identical on every rank and
the run equals a single-process run on the same batches. Rank 0 alone writes files; the
others wait at a barrier before they read what it wrote.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from sparsekernels.pruning.distributed import is_distributed, world_size
from sparsekernels.recipes.config import RecipeConfigError


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def setup(device: str = "auto") -> torch.device:
    """Join the process group the launcher describes (WORLD_SIZE > 1 in the environment) and
    return this process's device: "auto" is cuda:LOCAL_RANK when CUDA is available, else cpu."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise RecipeConfigError(f"device: {device!r} asked for, but torch sees no CUDA device "
                                f"(torch {torch.__version__}); set device: cpu or auto")
    if launched and not is_distributed():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return torch.device("cpu")
    if device in ("auto", "cuda"):
        index = int(os.environ.get("LOCAL_RANK", "0")) if launched else torch.cuda.current_device()
        dev = torch.device("cuda", index)
    else:
        dev = torch.device(device)
    torch.cuda.set_device(dev)
    return dev


def local_batch(batch: dict, device: torch.device) -> dict:
    """This rank's slice of a global batch, on `device` (the whole batch without DDP)."""
    n = world_size()
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.tensor_split(n)[rank()] if n > 1 else value
            value = value.to(device, non_blocking=True)
        out[key] = value
    return out


def shard(batches: list[dict], device: torch.device) -> list[dict]:
    """local_batch of every batch; batches too small to give every rank an example are
    dropped (DDP cannot step on an empty slice)."""
    n = world_size()
    return [local_batch(b, device) for b in batches if len(b["labels"]) >= n]


def wrap(module: nn.Module) -> nn.Module:
    """DDP(module) under torch.distributed, else the module itself. find_unused_parameters:
    the distiller's layer maps are used only for the layers matched at each step."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True)


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank: a decision taken from a clock (when to checkpoint) must
    be the same on all ranks, or they would wait at different barriers."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())
