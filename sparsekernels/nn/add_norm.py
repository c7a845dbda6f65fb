"""A post-norm block's residual add and LayerNorm as one op: fuse_add_norm_ / unfuse_add_norm_.

BERT-style encoders end each attention and FFN block in a module computing
LayerNorm(dropout(dense(h)) + residual). fuse_add_norm_ gives each such module (found by the
model map, arch.find_add_norm, and checked on a random probe) a forward that, in inference,
runs dense and then sparsekernels::add_layer_norm: one pass over the activations where torch
makes two ops and five. Where dense is a sparse layer whose kernel has the norm as an
epilogue (int8 layers; bf16 layers on AVX-512 BF16), the two are one kernel call: the kernel
normalizes each chunk of rows as it finishes it, while the rows are in cache. A fused FFN
(nn.sparse_ffn) ending in such a module computes the norm in its own kernel: fuse_ffn_ first,
then fuse_add_norm_ links the two (_FFNLink), as ModelSpeedup does. In training, or when a
gradient is needed, the module's own forward runs. Parameters, module names and the
state_dict do not change; ModelSpeedup's kernel and auto modes apply it and record it, so a
loaded model is fused again.
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
    ffn: "_FFNLink | None" = None  # set when dense is the pass-through half of a fused FFN


@dataclass
class _FFNLink:
    """A fused FFN whose output goes to a fused post-norm module (`owner`): in inference the
    FFN's kernel adds its input as the residual and normalizes (the post-norm block
    norm(FFN(x) + x)), and the owner passes that tensor on. The owner checks that it gets the
    very tensor the FFN returned and the FFN's input as its residual; with another residual
    it runs the FFN again without the norm (correct, not fast)."""

    owner: nn.Module
    state: _AddNorm
    ffn: nn.Module  # the FFN's first layer (FusedFFNInput / FusedQuantizedFFNInput)
    y: torch.Tensor | None = None  # the normed output handed over, until the owner takes it
    x: torch.Tensor | None = None  # the FFN's input it was computed from

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """norm(FFN(x) + x) when the owner is still fused and in inference, else None."""
        state = self.state
        if self.owner.__dict__.get(_STATE) is not state or not _inference(self.owner, state, x):
            return None
        y = self.ffn.add_norm_forward(x, x, state.norm)
        self.y, self.x = (y, x) if y is not None else (None, None)
        return y

    def take(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """The owner's output when h is the FFN's normed output; else None."""
        if self.y is None or h is not self.y:
            return None
        x, self.y, self.x = self.x, None, None
        if residual is x:
            return h
        norm = self.state.norm
        return add_layer_norm(self.ffn.ffn_forward(x), residual, norm.weight, norm.bias, norm.eps)


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
    if state.ffn is not None:  # the fused FFN before it may have normed already
        y = state.ffn.take(hidden_states, input_tensor)
        if y is not None:
            return y
    if args or kwargs or not _inference(self, state, hidden_states, input_tensor):
        return type(self).forward(self, hidden_states, input_tensor, *args, **kwargs)
    norm = state.norm
    dense = state.dense
    if type(dense).__dict__.get("add_norm_forward") is not None:  # exact sparse layer classes
        y = dense.add_norm_forward(hidden_states, input_tensor, norm)
        if y is not None:
            return y
    return add_layer_norm(dense(hidden_states), input_tensor, norm.weight, norm.bias, norm.eps)


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

    report = swap_checked(model, find_add_norm(model), _STATE, _fused_forward, check, "fused",
                          "already fused", names)
    _link_ffns(model, [n for n, why in report.items() if why in ("fused", "already fused")])
    return report


def _link_ffns(model: nn.Module, names) -> None:
    """Link each of these fused modules whose dense is the second layer of a fused FFN
    (nn.sparse_ffn keeps it as `_ffn.fc2` of the first) to that FFN (_FFNLink)."""
    firsts = {id(m.__dict__["_ffn"].fc2): m for m in model.modules()
              if "_ffn" in m.__dict__ and hasattr(m.__dict__["_ffn"], "fc2")}
    for name in names:
        owner = model.get_submodule(name)
        state = owner.__dict__[_STATE]
        ffn = firsts.get(id(state.dense))
        if ffn is None or not hasattr(ffn, "add_norm_forward"):
            continue
        state.ffn = _FFNLink(owner, state, ffn)
        ffn.__dict__["_ffn"].add_norm = state.ffn


def unfuse_add_norm_(model: nn.Module) -> int:
    """Undo fuse_add_norm_; returns how many modules."""
    for module in model.modules():
        state = module.__dict__.get(_STATE)
        if state is not None and state.ffn is not None:  # the FFN normalizes no more
            fused = state.ffn.ffn.__dict__.get("_ffn")
            if fused is not None and fused.add_norm is state.ffn:
                fused.add_norm = None
    return restore_forwards(model, _STATE)
