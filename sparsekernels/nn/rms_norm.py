"""RMS norms on one op: rms_norms_ / undo_rms_norms_.

A decoder LLM's RMS norms (LlamaRMSNorm and kin, torch.nn.RMSNorm: two or more per layer)
are five or six ATen ops each in transformers; at decode, one row per call, their per-op cost
is most of their time. rms_norms_ gives each norm the model map finds (arch.find_rms_norms),
once a probe confirms its forward computes x / rms(x) * weight (or * (1 + weight)), a forward
that runs sparsekernels::rms_norm in inference; in training, or when a gradient is needed,
the module's own forward runs. Parameters, names and the state_dict do not change;
ModelSpeedup's kernel and auto modes apply it and record it, so a loaded model gets it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekernels.nn.forward_swap import agrees, random_copy, restore_forwards, swap_checked
from sparsekernels.ops.rms_norm import rms_norm

_STATE = "_rms_norm"


@dataclass(frozen=True)
class _Rms:
    eps_attr: str
    offset: bool
    round_normed: bool


def _run(module: nn.Module, state: _Rms, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(module, state.eps_attr)
    if eps is None:  # torch.nn.RMSNorm's default: the dtype's machine epsilon
        eps = torch.finfo(x.dtype).eps
    return rms_norm(x, module._parameters.get("weight"), float(eps), state.offset,
                    state.round_normed)


def _forward(self, x, *args, **kwargs):
    """The norm's forward once on the op (bound to the module by rms_norms_)."""
    weight = self._parameters.get("weight")
    if args or kwargs or self.training or (torch.is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad))):
        return type(self).forward(self, x, *args, **kwargs)
    return _run(self, self.__dict__[_STATE], x)


def _probe_agrees(module: nn.Module, state: _Rms) -> bool:
    """The module's own forward and the op agree on a random input, on a random-weight copy
    (nn.forward_swap)."""
    probe = random_copy(module)
    weight = probe._parameters.get("weight") if probe is not None else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    x = torch.randn(3, weight.shape[0], dtype=weight.dtype, device=weight.device) * 3
    try:
        with torch.no_grad():
            want = type(probe).forward(probe, x)
            got = _run(probe, state, x)
    except Exception:  # a forward that takes more than x
        return False
    return agrees(got, want, 1e-5 if weight.dtype in (torch.float32, torch.float64)
                  else 2 ** -7)  # bf16: an ulp


def rms_norms_(model: nn.Module, names=None) -> dict[str, str]:
    """Run every RMS norm of `model` (those named in `names`, default all) on the op in
    inference, in place. Returns {norm name: "kernel" or why it was left as it is}."""
    from sparsekernels.arch.find import find_rms_norms

    def check(site, module):
        state = _Rms(site.eps_attr, site.offset, site.round_normed)
        if not _probe_agrees(module, state):
            return "left as is: its forward is not x / rms(x) * weight on a probe"
        return state

    return swap_checked(model, find_rms_norms(model), _STATE, _forward, check, "kernel",
                        "already on the op", names)


def undo_rms_norms_(model: nn.Module) -> int:
    """Undo rms_norms_; returns how many norms."""
    return restore_forwards(model, _STATE)
