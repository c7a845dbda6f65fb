"""Training and evaluation loops shared by the recipe's stages (plain PyTorch)."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator

import torch
from torch import nn


def cycle(batches: list[dict], seed: int, skip: int = 0) -> Iterator[dict]:
    """Endless batches, reshuffled (deterministically) at every pass. `skip` drops the first
    batches unseen, so a resumed run continues the order of the interrupted one."""
    g = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        for i in torch.randperm(len(batches), generator=g).tolist():
            if skip:
                skip -= 1
                continue
            yield batches[i]


def make_optimizer(params, lr: float, total_steps: int, warmup_ratio: float = 0.0,
                   weight_decay: float = 0.0):
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = int(warmup_ratio * total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def param_shapes(opt) -> list[list[int]]:
    """The shapes of an optimizer's parameters, in order: saved with its state, so a resumed
    run can check the state belongs to its parameters before loading it."""
    return [list(p.shape) for g in opt.param_groups for p in g["params"]]


def train_steps(model: nn.Module, batches: Iterator[dict], steps: int, opt, sched,
                loss_fn: Callable[[nn.Module, dict], torch.Tensor], progress=None) -> float:
    """`steps` optimizer steps; returns the mean loss of the last tenth."""
    model.train()
    tail = []
    for step in range(steps):
        batch = next(batches)
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return sum(tail) / max(1, len(tail))


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[dict]) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        pred = model(**inputs).logits.argmax(-1)
        correct += int((pred == batch["labels"]).sum())
        total += int(batch["labels"].numel())
    model.train(was)
    return 100.0 * correct / max(1, total)


def steps_for_epochs(epochs: float, n_batches: int) -> int:
    return max(1, math.ceil(epochs * n_batches))
