"""The model map: one description of a model's structure, read by every other layer.

    m = map_model(model, dummy_input)     # or describe(model) to print it
    m.layers      per layer: its attention sites (self, cross) and its FFN site
    m.attention   every AttentionSite (Q, K, V, O or a fused QKV; heads, kv heads, head size,
                  Q/K norms, cross attention, rotary dims)
    m.ffn         every FFNSite (up, optional gate, down or a fused gate-up; the activation)
    m.streams     the residual stream(s): every producer and consumer of the hidden channels,
                  norms, embeddings, free parameters (ViT's cls_token); needs a dummy input
    m.tied        modules sharing one weight (tied embeddings)

Attention and FFN sites come from structure (arch.find, through the tables of arch.names);
the residual stream, and FFNs no table describes, from one traced forward (arch.trace).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from sparsekernels.arch import layers
from sparsekernels.arch.find import (StructureError, _layer_of, find_attention, find_ffn,
                                      find_layers)
from sparsekernels.arch.sites import AttentionSite, FFNSite
from sparsekernels.arch.trace import ChannelGroup, find_channel_groups


@dataclass(frozen=True)
class LayerMap:
    """One repeated block (an encoder or decoder layer)."""

    name: str
    attention: tuple[AttentionSite, ...]
    ffn: Optional[FFNSite]


@dataclass(frozen=True)
class Stream:
    """A residual stream: channel j of the stream is member.index[j] of every member."""

    group: ChannelGroup
    norms: tuple[str, ...]
    embeddings: tuple[str, ...]
    params: tuple[str, ...]

    @property
    def width(self) -> int:
        return self.group.size

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(sorted(self.group.names("out")))

    @property
    def consumers(self) -> tuple[str, ...]:
        return tuple(sorted(self.group.names("in")))


@dataclass(frozen=True)
class ModelMap:
    model_class: str
    layer_lists: tuple[tuple[str, tuple[str, ...]], ...]
    layers: tuple[LayerMap, ...]
    attention: tuple[AttentionSite, ...]
    ffn: tuple[FFNSite, ...]
    tied: tuple[tuple[str, ...], ...]
    channel_groups: Optional[tuple[ChannelGroup, ...]] = None
    streams: tuple[Stream, ...] = ()
    notes: tuple[str, ...] = field(default=())

    # -- lookups ------------------------------------------------------------------------
    def attention_site(self, module: str) -> Optional[AttentionSite]:
        """The attention site that `module` (the site itself or a projection) belongs to."""
        for site in self.attention:
            if module == site.name or module in site.projections:
                return site
        return None

    def ffn_site(self, module: str) -> Optional[FFNSite]:
        for site in self.ffn:
            if module in (site.name, site.up, site.down, site.gate):
                return site
        return None

    def require(self, part: str) -> None:
        """Raise StructureError naming what was looked for when `part` ("attention", "ffn",
        "layers" or "stream") was not found."""
        found = {"attention": self.attention, "ffn": self.ffn, "layers": self.layers,
                 "stream": self.streams}[part]
        if found:
            return
        from sparsekernels.arch import names

        looked = {
            "attention": "modules with query/key/value children named "
                         + ", ".join("/".join(t) for t in names.QKV_CHILDREN)
                         + " or a fused " + "/".join(names.FUSED_QKV_CHILDREN)
                         + ", and an output projection",
            "ffn": "FFN parts named " + "; ".join(
                f"{p.gate + ' + ' if p.gate and not p.gate_up_fused else ''}{p.up} -> {p.down}"
                for p in names.FFN_PATTERNS) + ", or (with a dummy input) two layers whose "
                "channels meet only each other",
            "layers": "a ModuleList of identical blocks holding Linear layers",
            "stream": "channels shared by norms and embeddings (needs a dummy input)",
        }[part]
        raise StructureError(f"no {part} found in {self.model_class}: looked for {looked}. "
                             f"What was found:\n{self}")

    # -- printing -----------------------------------------------------------------------
    def __str__(self) -> str:
        return "\n".join(_render(self))


def _common_prefix(names_: list[str]) -> str:
    parts = [n.split(".") for n in names_]
    prefix = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _traced_ffn(groups, attention, known: set[str], modules, layer_paths) -> list[FFNSite]:
    """FFNs no pattern names: channels written by layers that only layers writing the
    residual stream read (the second layer of an FFN), with no norm in between."""
    owned = set()
    for site in attention:
        owned |= {(site.q, "out"), (site.k, "out"), (site.v, "out"), (site.o, "in")}
    stream_writers = {m.name for g in groups if any(m.kind == "norm" for m in g.members)
                      for m in g.members if m.kind == "out"}
    sites = []
    for g in groups:
        if {(m.name, m.kind) for m in g.members} & owned:
            continue
        if any(m.kind in ("norm", "param") or layers.type_name(modules[m.name]) == "Embedding"
               for m in g.members if m.kind != "param"):
            continue
        readers, writers = sorted(g.names("in")), sorted(g.names("out"))
        if not readers or not writers or not set(readers) <= stream_writers:
            continue
        if set(writers) & known or len(readers) != 1 or len(writers) > 2:
            continue
        gate = writers[1] if len(writers) == 2 else None
        name = _common_prefix(writers + readers)
        sites.append(FFNSite(name, writers[0], readers[0], g.size, gate=gate,
                             layer=_layer_of(name, layer_paths)))
    return sites


def _streams(groups, modules) -> tuple[Stream, ...]:
    streams = []
    for g in groups:
        if any(m.kind == "in" and layers.type_name(modules[m.name]) == "Embedding"
               for m in g.members):
            continue  # a vocabulary (tied embeddings)
        norms = tuple(sorted(m.name for m in g.members if m.kind == "norm"))
        params = tuple(sorted(m.name for m in g.members if m.kind == "param"))
        embeddings = tuple(sorted(m.name for m in g.members if m.kind == "out"
                                  and layers.type_name(modules[m.name]) == "Embedding"))
        if norms or params or embeddings:
            streams.append(Stream(g, norms, embeddings, params))
    return tuple(sorted(streams, key=lambda s: -len(s.group.members)))


def _tied(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    by_weight: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            by_weight.setdefault(id(w), []).append(name)
    return tuple(tuple(v) for v in by_weight.values() if len(v) > 1)


def map_model(model: nn.Module, dummy_input: Any = None) -> ModelMap:
    """Describe `model`. Without `dummy_input` only what structure tells is found (layers,
    attention, the FFNs arch.names describes, tied weights); with one, a traced forward adds
    the residual streams, every channel group and the FFNs no table describes."""
    modules = dict(model.named_modules())
    attention = tuple(find_attention(model))
    ffn = list(find_ffn(model))
    lists = find_layers(model)
    groups, streams = None, ()
    if dummy_input is not None:
        groups = tuple(find_channel_groups(model, dummy_input))
        known = {n for s in ffn for n in (s.up, s.down, s.gate) if n}
        layer_paths = [p for _, paths in lists for p in paths]
        ffn += _traced_ffn(groups, attention, known, modules, layer_paths)
        streams = _streams(groups, modules)
    notes = []
    layer_maps = []
    for list_name, paths in lists:
        for path in paths:
            att = tuple(s for s in attention if s.layer == path)
            f = next((s for s in ffn if s.layer == path), None)
            layer_maps.append(LayerMap(path, att, f))
            if not att:
                notes.append(f"{path}: no attention found")
            if f is None:
                notes.append(f"{path}: no FFN found")
    if not lists:
        notes.append("no ModuleList of repeated layers found")
    return ModelMap(type(model).__name__, tuple((n, tuple(p)) for n, p in lists),
                    tuple(layer_maps), attention, tuple(ffn), _tied(model), groups, streams,
                    tuple(notes))


# --- printing -------------------------------------------------------------------------------
def _rel(path: str, prefix: Optional[str]) -> str:
    if prefix and path == prefix:
        return "(the layer)"
    return path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else path


def _attention_line(site: AttentionSite, prefix: Optional[str]) -> str:
    r = lambda p: _rel(p, site.name) if p.startswith(site.name + ".") else _rel(p, prefix)
    proj = (f"{r(site.q)} (fused QKV, {site.qkv_layout})" if site.fused
            else f"{r(site.q)}, {r(site.k)}, {r(site.v)}")
    heads = f"{site.num_heads} heads"
    if site.num_kv_heads != site.num_heads:
        heads += f", {site.num_kv_heads} kv heads (groups of {site.group_size})"
    extra = []
    if site.cross:
        extra.append("cross")
    if site.qk_norm:
        extra.append(f"QK norms per {site.qk_norm}")
    if site.rotary_dims:
        extra.append(f"rotary on {site.rotary_dims} dims")
    tail = f"; {', '.join(extra)}" if extra else ""
    return (f"attention {_rel(site.name, prefix)}: {proj} -> {r(site.o)}; {heads} of size "
            f"{site.head_dim}{tail}")


def _ffn_line(site: FFNSite, prefix: Optional[str]) -> str:
    r = lambda p: _rel(p, prefix)
    act = site.activation or "activation ?"
    if site.gate_up_fused:
        body = f"{act}(gate) * up of fused {r(site.up)}"
    elif site.gated:
        body = f"{act}({r(site.gate)}) * {r(site.up)}"
    else:
        body = f"{act}({r(site.up)})"
    return f"ffn {_rel(site.name, prefix)}: {body} -> {r(site.down)}; {site.units} units"


def _signature(layer: LayerMap) -> tuple:
    att = tuple(_attention_line(s, layer.name) for s in layer.attention)
    return att, _ffn_line(layer.ffn, layer.name) if layer.ffn else None


def _render(m: ModelMap) -> list[str]:
    lines = [f"model map of {m.model_class}"]
    for list_name, paths in m.layer_lists:
        lines.append(f"  {list_name}: {len(paths)} layers")
        group: list[LayerMap] = [l for l in m.layers if l.name in paths]
        i = 0
        while i < len(group):
            j = i
            while j + 1 < len(group) and _signature(group[j + 1]) == _signature(group[i]):
                j += 1
            label = (f"layer {_rel(group[i].name, list_name)}" if i == j else
                     f"layers {_rel(group[i].name, list_name)}-{_rel(group[j].name, list_name)}")
            lines.append(f"    {label}:")
            att, ffn = _signature(group[i])
            lines += [f"      {a}" for a in att]
            lines.append(f"      {ffn}" if ffn else "      ffn: not found")
            i = j + 1
    in_layers = {l.name for l in m.layers}
    for site in m.attention:
        if site.layer not in in_layers:
            lines.append(f"  {_attention_line(site, None)}")
    for site in m.ffn:
        if site.layer not in in_layers:
            lines.append(f"  {_ffn_line(site, None)}")
    for s in m.streams:
        lines.append(f"  residual stream: {s.width} channels, {len(s.producers)} writers, "
                     f"{len(s.consumers)} readers, {len(s.norms)} norms")
        if s.embeddings:
            lines.append(f"    embeddings: {', '.join(s.embeddings)}")
        if s.params:
            lines.append(f"    free parameters: {', '.join(s.params)}")
    if m.channel_groups is None:
        lines.append("  residual stream: not traced (pass a dummy input)")
    for names_ in m.tied:
        lines.append(f"  tied weights: {' = '.join(names_)}")
    lines += [f"  not found: {n}" for n in m.notes]
    return lines


def describe(model: nn.Module, dummy_input: Any = None, file=None) -> ModelMap:
    """Print the model map of `model` (what was found and what was not) and return it.
    Without `dummy_input`, one is made from the model's config when it can be."""
    from sparsekernels.arch.inputs import example_input

    if dummy_input is None:
        dummy_input = example_input(model)
    m = map_model(model, dummy_input)
    print(m, file=file)
    return m
