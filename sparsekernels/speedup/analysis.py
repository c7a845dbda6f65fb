"""Which units of a masked model can be removed without changing its output.

One job: read the (already masked) weights and decide, exactly:
- heads: a head whose value rows are zero contributes a constant (its value bias through the
  output projection, folded into that bias); a head whose output-projection columns are
  zero contributes nothing. Either is removed. Heads with only query/key rows zero are
  partly masked and kept (reported).
- intermediate channels (FFN units, gated or not, pooler): a channel no consumer reads is
  removed; a channel whose producer rows (every one: up and gate) are zero carries a
  constant, the same on every input: computed from the weights (the producers' biases
  through the FFN's activation, as the model map knows it), else read off one forward, and
  folded into the consumer's bias. A masked channel the weights do not prove constant (a
  gate row masked while its up row lives) stays, reported, whatever the dummy batch.
- residual-stream (hidden) channels: removable only when every producer on the stream
  (embeddings, output projections, FFN outputs, norms, free parameters such as ViT's
  cls_token) is zero there, so the channel is zero everywhere (an RMS norm writes only its
  bias there: it scales a zero input; a LayerNorm's weight and bias both write); norms keep
  normalising over the original width. A channel any producer keeps stays (reported as reconciled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from sparsekernels.arch import AttentionSite, ChannelGroup, FFNSite, layers, map_model
from sparsekernels.arch.inputs import run_model
from sparsekernels.ops.bsr_ffn import activate


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


# --- heads ----------------------------------------------------------------------------------
def _uniform_groups(removable: torch.Tensor, groups: int, size: int) -> list[int]:
    """The query heads to keep when every key/value group must keep the same number of them
    (grouped-query attention repeats each kv head for a fixed number of query heads): groups
    with a live head stay, and each keeps its live heads plus, where it has fewer than the
    fullest group, its first removable ones (which then run, computing what they compute)."""
    live = [[i for i in range(g * size, (g + 1) * size) if not removable[i]] for g in range(groups)]
    width = max((len(heads) for heads in live), default=0)
    kept = []
    for g, heads in enumerate(live):
        if not heads:
            continue
        spare = [i for i in range(g * size, (g + 1) * size) if removable[i]]
        kept += heads + spare[: width - len(heads)]
    return sorted(kept)


def plan_heads(model: nn.Module, blocks: list[AttentionSite], plan: Plan,
               uniform_groups: bool = True) -> None:
    """Removable heads: a query head whose output columns are zero, or whose key/value head's
    value rows are zero (it outputs the value bias, folded through O). With grouped-query
    attention a key/value head goes with the last of its query heads, and `uniform_groups`
    (resize) keeps the same number of query heads in every group."""
    modules = dict(model.named_modules())
    for block in blocks:
        plan.blocks[block.name] = block
        h, r = block.num_heads, block.group_size
        q, v, o = modules[block.q], modules[block.v], modules[block.o]
        v_rows, o_cols = block.rows("v"), block.o_cols()
        group_of = torch.arange(h) // r
        v_dead = _rows_zero(v)[v_rows].all(dim=1).cpu()[group_of]
        o_dead = _cols_zero(o)[o_cols].all(dim=1).cpu()
        q_dead = _rows_zero(q)[block.rows("q")].all(dim=1).cpu()
        removable = v_dead | o_dead
        kept = (_uniform_groups(removable, block.num_kv_heads, r) if uniform_groups
                else [i for i in range(h) if not removable[i]])
        dropped = [i for i in range(h) if i not in kept]
        # a value-masked head outputs its value bias on every token: fold it through O
        bias_v = _bias(v)
        if bias_v is not None:
            wo = _canonical(o)
            delta = torch.zeros(wo.shape[0], dtype=wo.dtype, device=wo.device)
            for i in dropped:
                if v_dead[i] and not o_dead[i]:
                    delta += wo[:, o_cols[i]] @ bias_v[v_rows[group_of[i]]]
            if delta.abs().max() > 0:
                plan.bias_folds[block.o] = plan.bias_folds.get(block.o, 0) + delta
        partial = [i for i in kept if q_dead[i] and not removable[i]]
        if partial:
            plan.notes.append(f"{block.name}: heads {partial} have zero query rows but live value "
                              "and output weights: partly masked, kept")
        spare = [i for i in kept if removable[i]]
        if spare:
            plan.notes.append(f"{block.name}: masked heads {spare} kept so that every key/value "
                              f"group keeps the same number of query heads (prune whole groups, "
                              "or as many query heads in each group)")
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
        # an RMS norm scales its input: where every other producer leaves the stream zero its
        # output is zero whatever its weight (LayerNorm subtracts the mean: its weight writes)
        rms = layers.type_name(norm) in ("RMSNorm", "T5LayerNorm")
        for attr in ("bias",) if rms else ("weight", "bias"):
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
                owned: set[tuple[str, str]], ffn_sites, plan: Plan) -> None:
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def read_inputs() -> dict[str, torch.Tensor]:  # one forward, only if a constant is read
        if not captured:
            names = {m.name for g in groups for m in g.members if m.kind == "in"}
            captured.update(capture_inputs(model, dummy_input, names))
        return captured
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
            if not live.any():
                live[0] = True  # the stream keeps one channel: nothing runs at zero width
                plan.notes.append("hidden channels: every channel is zero; one is kept so the "
                                  "model keeps a width")
            _record_group(group, ~live, modules, plan)
            half_zero = torch.zeros(group.size, dtype=torch.bool)
            for m in producers:
                half_zero |= ~_producer_nonzero(m, modules).cpu()
            conflicts = int((half_zero & live).sum())
            if conflicts and (~live).any():
                plan.notes.append(f"hidden channels: {conflicts} channels are masked in some "
                                  "coupled layers but kept by others: they stay")
            continue
        _plan_intermediate(group, producers, consumers, modules, ffn_sites, read_inputs, plan)


def _ffn_site_of(group: ChannelGroup, sites) -> Optional[FFNSite]:
    writers, readers = group.names("out"), group.names("in")
    for site in sites:
        if site.down in readers and set(site.first_layers) <= writers:
            return site
    return None


def _proven_constant(site: Optional[FFNSite], group: ChannelGroup, modules,
                     dead: list[tuple[Any, torch.Tensor]]):
    """(which channels the weights prove constant, their value), from the producers' rows
    and biases through the FFN's activation; None when the model map does not know the
    function between the producers and the reader. Plain: a zero up row carries act(b_up).
    Gated, act(gate) * up: a zero up row with a zero bias, or a zero gate row whose act(b_gate)
    is 0, carries 0; both rows zero carry act(b_gate) * b_up; one zero row beside a live one
    otherwise carries something that depends on the input."""
    if site is None or site.activation is None:
        return None

    def part(name: str, second_half: bool):
        """(rows dead, bias) of a first layer; a fused gate-up's halves are [gate; up]."""
        for member, rows in dead:
            first = int(member.index.view(-1)[0]) if member.index.numel() else 0
            if member.name == name and (not site.gate_up_fused
                                        or (first >= site.units) == second_half):
                b = _bias(modules[name])
                if b is None:
                    return rows, torch.zeros(group.size, dtype=torch.float64)
                return rows, b[member.index.view(-1).to(b.device)].double().cpu()
        raise LookupError(name)

    try:
        up_dead, b_up = part(site.up, second_half=True)
        if not site.gated:
            return up_dead, activate(b_up, site.activation)
        gate_dead, b_gate = part(site.gate, second_half=False)
    except LookupError:
        return None
    act_gate = activate(b_gate, site.activation)
    zero = (up_dead & (b_up == 0)) | (gate_dead & (act_gate == 0))
    both = up_dead & gate_dead
    return zero | both, torch.where(zero, torch.zeros_like(b_up), act_gate * b_up)


def _plan_intermediate(group: ChannelGroup, producers, consumers, modules, ffn_sites,
                       read_inputs, plan: Plan) -> None:
    """Channels between two layers (FFN units, a pooler): removed only when the weights prove
    what they carry. A channel no consumer reads goes. For an FFN the model map knows, the
    value of a channel with masked rows is computed from the weights (_proven_constant) and
    folded into the consumers' biases. Elsewhere a channel whose every producer row is zero
    carries the same value on every input, read off one forward (any row gives it). Any
    other masked channel stays, and the plan says so."""
    dead: list[tuple[Any, torch.Tensor]] = []
    all_dead = torch.ones(group.size, dtype=torch.bool)
    any_dead = torch.zeros(group.size, dtype=torch.bool)
    for m in producers:
        rows = _rows_zero(modules[m.name]).cpu()[m.index.view(-1).cpu()]
        dead.append((m, rows))
        all_dead &= rows
        any_dead |= rows
    unread = torch.ones(group.size, dtype=torch.bool)
    for m in consumers:
        unread &= _cols_zero(modules[m.name]).cpu()[m.index.view(-1).cpu()]
    if not (any_dead | unread).any():
        return
    proven = _proven_constant(_ffn_site_of(group, ffn_sites), group, modules, dead)
    constants: dict[str, torch.Tensor] = {}
    if proven is not None:
        folded = proven[0] & ~unread
        constants = {m.name: proven[1] for m in consumers}
    else:
        folded = all_dead & ~unread
        for m in consumers if folded.any() else ():
            c = _read_constant(m, read_inputs())
            if c is None:
                folded = torch.zeros_like(folded)
                plan.notes.append(f"{sorted(group.names('in'))}: masked channels whose producers "
                                  "are all zero kept: the dummy batch has no row to read "
                                  "their constant from")
                break
            constants[m.name] = c
    removable = unread | folded
    kept = int(((any_dead | unread) & ~removable).sum())
    if kept:
        plan.notes.append(f"{sorted(group.names('in'))}: {kept} masked channels kept: the "
                          "weights do not prove them constant (e.g. a masked gate row beside "
                          "a live up row)")
    if removable.all():
        removable[0] = False  # a layer keeps one unit: a zero-width Linear cannot run
        plan.notes.append(f"{sorted(group.names('in'))}: every channel is masked; one is kept so "
                          "the layers keep a width (it carries what the masked model computes)")
    for m in consumers:
        module = modules[m.name]
        idx = m.index.view(-1)
        sel = (removable & folded).to(idx.device)
        if not sel.any():
            continue
        wc = _canonical(module)[:, idx[sel]]
        c = constants[m.name][sel.cpu()].to(device=wc.device, dtype=wc.dtype)
        delta = wc.reshape(wc.shape[0], -1) @ c
        if delta.abs().max() > 0:
            plan.bias_folds[m.name] = plan.bias_folds.get(m.name, 0) + delta
    _record_group(group, removable, modules, plan)


def _read_constant(member, inputs: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The consumer's input on the group's channels, from the first row of one forward."""
    x = inputs.get(member.name)
    if x is None or x.numel() == 0:
        return None
    x = x.reshape(-1, x.shape[-1])
    return x[0, member.index.view(-1).to(x.device)].double().cpu()


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
                    attention_channels(blocks), model_map.ffn, plan)
    return plan
