"""Local reconstruction after one-shot pruning: a pruned transformer layer's kept weights are
trained, on the calibration inputs, to give the dense model's output of that layer.

One job: the per-layer training step the one-shot pruners (:mod:`.oneshot`) run with
``reconstruct=``. Wanda keeps the kept weights as they were and SparseGPT updates them one
matrix at a time from that matrix's own inputs; both leave errors that add up through the
layers. Training the whole pruned layer (attention and MLP together, the nonlinearities
included) against the dense model's activations -- with the inputs the pruned layers before
it produce, so it also absorbs their error -- recovers much of the difference at the cost of
a few passes of forward and backward of one layer over the calibration set (Wagner et al.,
"A Free Lunch in LLM Compression: Revisiting Retraining after Pruning", 2025).

Only the pruned modules' weights and biases move (Adam, mean squared error); the layer's
norms and every other parameter stay as they are, and pruned weights stay exactly zero (the
masks are applied again after every step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from sparsekernels.pruning.pruners.calibration import LayerInput, layer_output

# lr chosen on held-out training-split windows (never the evaluation split): SparseGPT 50% on
# SmolLM2-135M, 16 calibration windows, 4 epochs; 1e-4 (the first default) was far too small
DEFAULTS = {"epochs": 4, "lr": 1e-3}


@dataclass(frozen=True)
class Reconstruction:
    """``epochs`` passes over the calibration batches, one Adam step per batch, at ``lr``."""

    epochs: int = DEFAULTS["epochs"]
    lr: float = DEFAULTS["lr"]


def parse_reconstruct(owner: str, value: Any) -> Reconstruction | None:
    """``None`` / ``False``: no reconstruction; ``True``: the defaults; an int: that many
    epochs; a dict with keys ``epochs`` and / or ``lr``."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    elif isinstance(value, int) and not isinstance(value, bool):
        value = {"epochs": value}
    if not isinstance(value, Mapping) or set(value) - set(DEFAULTS):
        raise ValueError(f"{owner}: reconstruct must be None, True, a number of epochs or a "
                         f"dict with keys {sorted(DEFAULTS)}, got {value!r}")
    params = {**DEFAULTS, **value}
    epochs, lr = params["epochs"], params["lr"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"{owner}: reconstruct epochs must be an int >= 1, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
            or lr <= 0:
        raise ValueError(f"{owner}: reconstruct lr must be a positive number, got {lr!r}")
    return Reconstruction(epochs, float(lr))


def _loss(layer: torch.nn.Module, x: LayerInput, target: torch.Tensor) -> torch.Tensor:
    out = layer_output(layer(x.hidden, *x.args, **x.kwargs))
    return F.mse_loss(out.float(), target.float())


def layer_error(layer: torch.nn.Module, inputs: Sequence[LayerInput],
                targets: Sequence[torch.Tensor]) -> float:
    """Mean squared error of ``layer`` against ``targets`` over the batches."""
    with torch.no_grad():
        return sum(float(_loss(layer, x, t)) for x, t in zip(inputs, targets)) / len(inputs)


def reconstruct_layer(layer: torch.nn.Module, inputs: Sequence[LayerInput],
                      targets: Sequence[torch.Tensor],
                      masked: Mapping[torch.nn.Parameter, torch.Tensor],
                      spec: Reconstruction) -> tuple[float, float]:
    """Train the parameters in ``masked`` (parameter -> its 0/1 mask in the parameter's own
    layout) so ``layer(inputs)`` matches ``targets``; returns the mean squared error over the
    calibration batches before and after. A layer the training made worse on them gets its
    weights back (the error after is then the one before)."""
    before = layer_error(layer, inputs, targets)
    params = list(masked)
    saved = [p.detach().clone() for p in params]
    flags = {p: p.requires_grad for p in layer.parameters()}
    masks = {p: m.to(device=p.device, dtype=p.dtype) for p, m in masked.items()}
    try:
        for p in flags:
            p.requires_grad_(p in masks)
        opt = torch.optim.Adam(params, lr=spec.lr)
        with torch.enable_grad():
            for _ in range(spec.epochs):
                for x, target in zip(inputs, targets):
                    opt.zero_grad(set_to_none=True)
                    _loss(layer, x, target).backward()
                    opt.step()
                    with torch.no_grad():
                        for p, m in masks.items():
                            p.mul_(m)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    after = layer_error(layer, inputs, targets)
    if not after <= before:  # worse (a step size too large for this layer) or not finite
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.copy_(old)
        after = before
    return before, after
