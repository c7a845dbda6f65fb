"""Which units of a masked model can be removed without changing its output.

One job: read the (already masked) weights and decide, exactly:
- heads: a head whose value rows are zero contributes a constant (its value bias through the
  output projection, folded into that bias); a head whose output-projection columns are
  zero contributes nothing. Either is removed. Heads with only query/key rows zero are
  partly masked and kept (reported).
- intermediate channels (FFN units, gated or not, pooler): a channel whose producer row is
  zero, or whose consumer columns are all zero, carries a constant; the constant is read
  from the consumer's input on the dummy batch (it must be identical on every token) and
  folded into the consumer's bias.
- residual-stream (hidden) channels: removable only when every producer on the stream
  (embeddings, output projections, FFN outputs, norms, free parameters such as ViT's
  cls_token) is zero there, so the channel is zero everywhere; norms keep normalising over
  the original width. A channel any producer keeps stays (reported as reconciled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsekernels.arch import AttentionSite, ChannelGroup, layers, map_model
from sparsekernels.arch.inputs import run_model


@dataclass
class Plan:
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> bool keep (canonical out)
    cols: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> bool keep (canonical in)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # norm module -> bool keep
    params: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (module, attr) -> keep
    heads: dict[str, list[int]] = field(default_factory=dict)  # block -> kept heads
    bias_folds: dict[str, torch.Tensor] = field(default_factory=dict)  # consumer -> bias delta
    zero_heads: dict[str, int] = field(default_factory=dict)  # block -> head kept only to run
    notes: list[str] = field(default_factory=list)
    blocks: dict[str, AttentionSite] = field(default_factory=dict)

    def keep_rows(self, name: str, size: int, device) -> torch.Tensor:
        return self.rows.setdefault(name, torch.ones(size, dtype=torch.bool, device=device))

    def keep_cols(self, name: str, size: int, device) -> torch.Tensor:
        return self.cols.setdefault(name, torch.ones(size, dtype=torch.bool, device=device))


def _canonical(module: nn.Module) -> torch.Tensor:
    return layers.to_canonical(module, module.weight.detach())


def _rows_zero(module: nn.Module) -> torch.Tensor:
    w = _canonical(module)
    return (w.reshape(w.shape[0], -1) == 0).all(dim=1)


def _cols_zero(module: nn.Module) -> torch.Tensor:
    w = _canonical(module)
    return (w.transpose(0, 1).reshape(w.shape[1], -1) == 0).all(dim=1)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return module.bias.detach() if layers.has_bias(module) else None


def capture_inputs(model: nn.Module, dummy_input: Any, names: set[str]) -> dict[str, torch.Tensor]:
    """The first input of each named module on one forward of the dummy batch."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: captured.setdefault(name, args[0].detach())))
    try:
        run_model(model, dummy_input)
    finally:
        for h in handles:
            h.remove()
    return captured


# --- heads ----------------------------------------------------------------------------------
def plan_heads(model: nn.Module, blocks: list[AttentionSite], plan: Plan) -> None:
    modules = dict(model.named_modules())
    for block in blocks:
        plan.blocks[block.name] = block
        h, d = block.num_heads, block.head_dim
        q, v, o = modules[block.q], modules[block.v], modules[block.o]
        v_rows = block.rows("v")
        v_rows_zero = _rows_zero(v)[v_rows].all(dim=1)
        o_cols_zero = _cols_zero(o)[block.o_cols()].all(dim=1)
        q_rows_zero = _rows_zero(q)[block.rows("q")].all(dim=1)
        removable = v_rows_zero | o_cols_zero
        kept = [i for i in range(h) if not removable[i]]
        # a value-masked head outputs its value bias on every token: fold it through O
        bias_v = _bias(v)
        wo = _canonical(o)
        delta = torch.zeros(wo.shape[0], dtype=wo.dtype, device=wo.device)
        for i in range(h):
            if v_rows_zero[i] and not o_cols_zero[i] and bias_v is not None:
                bv = bias_v[v_rows[i]]
                delta += wo[:, i * d:(i + 1) * d] @ bv
        if delta.abs().max() > 0:
            plan.bias_folds[block.o] = plan.bias_folds.get(block.o, 0) + delta
        partial = [i for i in kept if q_rows_zero[i]]
        if partial:
            plan.notes.append(f"{block.name}: heads {partial} have zero query rows but live value "
                              "and output weights: partly masked, kept")
        if not kept:
            # attention code cannot run with zero heads: keep one head that outputs exactly 0
            kept = [0]
            plan.notes.append(f"{block.name}: every head is masked; one zeroed head is kept so "
                              "the attention module still runs")
            plan.zero_heads[block.name] = 0
        plan.heads[block.name] = kept


def attention_channels(blocks: list[AttentionSite]) -> set[tuple[str, str]]:
    """(module, kind) pairs whose channels are head channels: left to plan_heads."""
    owned = set()
    for b in blocks:
        owned |= {(b.q, "out"), (b.k, "out"), (b.v, "out"), (b.o, "in")}
    return owned


# --- channel groups -------------------------------------------------------------------------
def _is_stream(group: ChannelGroup, modules: dict[str, nn.Module]) -> bool:
    return any(m.kind in ("norm", "param") or
               (m.kind == "out" and layers.type_name(modules[m.name]) == "Embedding")
               for m in group.members)


def _producer_nonzero(member, modules) -> torch.Tensor:
    """[group size] bool: does this producer write a non-zero value on each channel?"""
    module = modules[member.name] if member.kind != "param" else None
    if member.kind == "out":
        live = ~_rows_zero(module)
        b = _bias(module)
        if b is not None:
            live = live | (b != 0)
        return live[member.index.view(-1)]
    if member.kind == "norm":
        norm = modules[member.name]
        live = torch.zeros(norm.weight.shape[0], dtype=torch.bool, device=norm.weight.device)
        for attr in ("weight", "bias"):
            p = getattr(norm, attr, None)
            if isinstance(p, torch.Tensor):
                live |= p.detach() != 0
        return live[member.index.view(-1)]
    if member.kind == "param":
        owner, _, attr = member.name.rpartition(".")
        value = getattr(modules[owner], attr).detach()
        return (value.reshape(-1, value.shape[-1]) != 0).any(0)[member.index.view(-1)]
    raise AssertionError(member.kind)


def plan_groups(model: nn.Module, dummy_input: Any, groups: list[ChannelGroup],
                owned: set[tuple[str, str]], plan: Plan) -> None:
    modules = dict(model.named_modules())
    intermediate: list[tuple[ChannelGroup, torch.Tensor]] = []
    for group in groups:
        kinds = {(m.name, m.kind) for m in group.members}
        if kinds & owned:
            continue  # head channels
        if any(m.kind == "in" and layers.type_name(modules[m.name]) == "Embedding"
               for m in group.members):
            continue  # a vocabulary (tied embeddings): never pruned
        producers = [m for m in group.members if m.kind != "in"]
        consumers = [m for m in group.members if m.kind == "in"]
        if not consumers:
            continue  # the model's own outputs
        if _is_stream(group, modules):
            live = torch.zeros(group.size, dtype=torch.bool)
            for m in producers:
                live |= _producer_nonzero(m, modules).cpu()
            _record_group(group, ~live, modules, plan)
            half_zero = torch.zeros(group.size, dtype=torch.bool)
            for m in producers:
                half_zero |= ~_producer_nonzero(m, modules).cpu()
            conflicts = int((half_zero & live).sum())
            if conflicts and (~live).any():
                plan.notes.append(f"hidden channels: {conflicts} channels are masked in some "
                                  "coupled layers but kept by others: they stay")
            continue
        dead = torch.zeros(group.size, dtype=torch.bool)
        for m in producers:
            dead |= _rows_zero(modules[m.name]).cpu()[m.index.view(-1).cpu()]
        unread = torch.ones(group.size, dtype=torch.bool)
        for m in consumers:
            unread &= _cols_zero(modules[m.name]).cpu()[m.index.view(-1).cpu()]
        candidates = dead | unread
        if candidates.any():
            intermediate.append((group, candidates))
    if not intermediate:
        return
    names = {m.name for g, _ in intermediate for m in g.members if m.kind == "in"}
    inputs = capture_inputs(model, dummy_input, names)
    for group, candidates in intermediate:
        consumers = [m for m in group.members if m.kind == "in"]
        removable = candidates.clone()
        folds: dict[str, torch.Tensor] = {}
        for m in consumers:
            module = modules[m.name]
            x = inputs[m.name]
            x = x.reshape(-1, x.shape[-1])[:, m.index.view(-1).to(x.device)]
            constant = (x == x[:1]).all(0).cpu() if x.shape[0] else torch.ones(group.size, dtype=torch.bool)
            read = ~_cols_zero(module).cpu()[m.index.view(-1).cpu()]
            # a candidate read by this consumer must carry one constant on every token
            removable &= constant | ~read
            folds[m.name] = (x[:1].reshape(-1) if x.shape[0] else torch.zeros(group.size)).to(
                module.weight.dtype)
        not_constant = int((candidates & ~removable).sum())
        if not_constant:
            plan.notes.append(f"{[m.name for m in consumers]}: {not_constant} masked channels "
                              "do not carry a constant (e.g. a gate kept them live): kept")
        for m in consumers:
            module = modules[m.name]
            idx = m.index.view(-1)
            sel = removable.to(idx.device)
            if not sel.any():
                continue
            wc = _canonical(module)[:, idx[sel]]
            delta = wc.reshape(wc.shape[0], -1) @ folds[m.name].to(wc.device)[sel]
            if delta.abs().max() > 0:
                plan.bias_folds[m.name] = plan.bias_folds.get(m.name, 0) + delta
        _record_group(group, removable, modules, plan)


def _record_group(group: ChannelGroup, remove: torch.Tensor, modules, plan: Plan) -> None:
    if not remove.any():
        return
    for m in group.members:
        idx = m.index.view(-1)
        drop = idx[remove.to(idx.device)]
        if m.kind == "param":
            owner, _, attr = m.name.rpartition(".")
            value = getattr(modules[owner], attr)
            keep = plan.params.setdefault((owner, attr), torch.ones(value.shape[-1], dtype=torch.bool))
            keep[drop.cpu()] = False
        elif m.kind == "norm":
            norm = modules[m.name]
            keep = plan.norms.setdefault(m.name, torch.ones(norm.weight.shape[0], dtype=torch.bool))
            keep[drop.cpu()] = False
        else:
            module = modules[m.name]
            out_f, in_f = layers.canonical_shape(module)[:2]
            keep = (plan.keep_rows(m.name, out_f, "cpu") if m.kind == "out"
                    else plan.keep_cols(m.name, in_f, "cpu"))
            keep[drop.cpu()] = False


def analyze(model: nn.Module, dummy_input: Any, heads: bool = True, channels: bool = True) -> Plan:
    plan = Plan()
    model_map = map_model(model, dummy_input if channels else None)
    blocks = list(model_map.attention)
    if heads:
        plan_heads(model, blocks, plan)
    if channels:
        plan_groups(model, dummy_input, list(model_map.channel_groups),
                    attention_channels(blocks), plan)
    return plan
