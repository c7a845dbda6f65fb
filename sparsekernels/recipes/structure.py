"""Where the recipe prunes: FFN units and hidden (residual-stream) channels, read from the
model map (patterns for the families it knows, traced channel groups for any other)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekernels.arch import layers, map_model


def ffn_input_layers(model: nn.Module, dummy: Any) -> list[str]:
    """The first layer(s) of every FFN the model map finds (up, and the gate of a gated FFN):
    the layers whose output channels are FFN units."""
    model_map = map_model(model, dummy)
    model_map.require("ffn")
    return sorted({name for site in model_map.ffn for name in site.first_layers})


def _channel_score(t: torch.Tensor, g: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    if g is None:
        return None
    s = (t.detach().double() * g.detach().double()).square()
    return s.movedim(dim, 0).reshape(s.shape[dim], -1).sum(1)


class StreamImportance:
    """First-order Taylor importance of each hidden channel, summed over every layer that
    reads or writes the residual stream (dependency-aware)."""

    def __init__(self, model: nn.Module, dummy: Any):
        self.model = model
        self.modules = dict(model.named_modules())
        streams = [s.group for s in map_model(model, dummy).streams if s.norms]
        if not streams:
            raise RuntimeError(f"no residual stream with norms found in {type(model).__name__}")
        self.group = max(streams, key=lambda g: len(g.members))
        self.scores = torch.zeros(self.group.size, dtype=torch.float64)

    def _member_score(self, m) -> torch.Tensor | None:
        if m.kind == "param":
            owner, _, attr = m.name.rpartition(".")
            p = getattr(self.modules[owner], attr)
            return _channel_score(p, p.grad, p.dim() - 1)
        module = self.modules[m.name]
        if m.kind == "norm":
            total = _channel_score(module.weight, module.weight.grad, 0)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and total is not None:
                b = _channel_score(bias, bias.grad, 0)
                total = total + b if b is not None else total
            return total
        w = layers.to_canonical(module, module.weight)
        g = module.weight.grad
        g = None if g is None else layers.to_canonical(module, g)
        dim = 0 if m.kind == "out" else 1
        total = _channel_score(w, g, dim)
        if m.kind == "out" and layers.has_bias(module) and total is not None:
            b = _channel_score(module.bias, module.bias.grad, 0)
            total = total + b if b is not None else total
        return total

    def accumulate(self) -> None:
        """Call after backward, before the optimizer step."""
        for m in self.group.members:
            s = self._member_score(m)
            if s is not None:
                self.scores += s.cpu()[m.index.view(-1).cpu()]

    def masks(self, sparsity: float) -> tuple[dict, torch.Tensor]:
        """Masks pruning the least important `sparsity` of the channels on every member of the
        stream (free parameters are zeroed in place), and the kept channel indices."""
        n = self.group.size
        order = torch.sort(self.scores, stable=True).indices
        prune = order[: round(sparsity * n)]
        kept = torch.sort(order[round(sparsity * n):]).values
        masks: dict = {}
        for m in self.group.members:
            idx = m.index.view(-1)[prune.to(m.index.device)]
            if m.kind == "param":
                owner, _, attr = m.name.rpartition(".")
                with torch.no_grad():
                    getattr(self.modules[owner], attr)[..., idx] = 0
                continue
            module = self.modules[m.name]
            entry = masks.setdefault(m.name, {})
            if m.kind == "norm":
                for p in ("weight", "bias"):
                    t = getattr(module, p, None)
                    if isinstance(t, torch.Tensor):
                        mk = entry.get(p, torch.ones_like(t))
                        mk[idx] = 0
                        entry[p] = mk
                continue
            w = entry.get("weight", torch.ones_like(module.weight))
            c = layers.to_canonical(module, w).clone()
            c.index_fill_(0 if m.kind == "out" else 1, idx.to(c.device), 0)
            entry["weight"] = layers.from_canonical(module, c)
            if m.kind == "out" and layers.has_bias(module):
                b = entry.get("bias", torch.ones_like(module.bias))
                b[idx] = 0
                entry["bias"] = b
        return masks, kept
