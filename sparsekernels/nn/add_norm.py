"""A post-norm block's residual add and LayerNorm as one op: fuse_add_norm_ / unfuse_add_norm_.

BERT-style encoders end each attention and FFN block in a module computing
LayerNorm(dropout(dense(h)) + residual). fuse_add_norm_ gives each such module (found by the
model map, arch.find_add_norm, and checked on a random probe) a forward that, in inference,
runs dense and then sparsekernels::add_layer_norm: one pass over the activations where torch
makes two ops and five. In training, or when a gradient is needed, the module's own forward
runs. Parameters, module names and the state_dict do not change; ModelSpeedup's kernel and
auto modes apply it and record it, so a loaded model is fused again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekernels.nn.forward_swap import agrees, random_copy, restore_forwards, swap_checked
from sparsekernels.ops.add_layer_norm import add_layer_norm

_STATE = "_add_norm"


@dataclass
class _AddNorm:
    dense: nn.Module
    dropout: nn.Dropout
    norm: nn.LayerNorm


def _inference(module: nn.Module, state: _AddNorm, *tensors) -> bool:
    if module.training or (state.dropout.training and state.dropout.p > 0):
        return False
    if not torch.is_grad_enabled():
        return True
    params = (state.norm.weight, state.norm.bias)
    return not any(t is not None and t.requires_grad for t in (*tensors, *params)) and not any(
        p.requires_grad for p in state.dense.parameters())


def _fused_forward(self, hidden_states, input_tensor, *args, **kwargs):
    """The module's forward once fused (bound to the module by fuse_add_norm_)."""
    state = self.__dict__[_STATE]
    if args or kwargs or not _inference(self, state, hidden_states, input_tensor):
        return type(self).forward(self, hidden_states, input_tensor, *args, **kwargs)
    norm = state.norm
    return add_layer_norm(state.dense(hidden_states), input_tensor, norm.weight, norm.bias,
                          norm.eps)


def _probe_agrees(module: nn.Module, site) -> bool:
    """The module's own forward and the fused one agree on random inputs, on a random-weight
    copy (nn.forward_swap): the map found the parts; this checks that the forward combines
    them as norm(dropout(dense(h)) + residual)."""
    from sparsekernels.arch import layers

    probe = random_copy(module)
    if probe is None:
        return False
    rel = len(site.name) + 1 if site.name else 0
    state = _AddNorm(*(probe.get_submodule(p[rel:]) for p in (site.dense, site.dropout,
                                                                site.norm)))
    norm = state.norm
    ref = norm.weight if norm.weight is not None else next(state.dense.parameters(), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    k = getattr(state.dense, "in_features", None)
    h = torch.randn(2, 3, k if isinstance(k, int) else layers.in_features(state.dense),
                    dtype=dtype, device=device)
    residual = torch.randn(2, 3, norm.normalized_shape[0], dtype=dtype, device=device)
    try:
        with torch.no_grad():
            want = type(probe).forward(probe, h, residual)
            got = add_layer_norm(state.dense(h), residual, norm.weight, norm.bias, norm.eps)
    except Exception:  # a forward that takes other arguments
        return False
    # bf16: torch rounds h + residual to bf16 before the norm
    return agrees(got, want, 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2)


def fuse_add_norm_(model: nn.Module, names=None) -> dict[str, str]:
    """Fuse the residual add and LayerNorm of every post-norm block of `model` (those named
    in `names`, default all), in place. Returns {module name: "fused" or why it was left}."""
    from sparsekernels.arch.find import find_add_norm

    def check(site, module):
        if not _probe_agrees(module, site):
            return ("left as is: its forward is not norm(dropout(dense(h)) + residual) on a "
                    "random input")
        return _AddNorm(*(model.get_submodule(p) for p in (site.dense, site.dropout, site.norm)))

    return swap_checked(model, find_add_norm(model), _STATE, _fused_forward, check, "fused",
                        "already fused", names)


def unfuse_add_norm_(model: nn.Module) -> int:
    """Undo fuse_add_norm_; returns how many modules."""
    return restore_forwards(model, _STATE)
