"""Find a model's layers, attention sites and FFN sites from its structure.

One job: read module children and size attributes through the tables in arch.names and
build AttentionSite / FFNSite records. No forward runs here (the residual stream and the
FFNs no table describes are found by tracing, in arch.model_map).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sparsekernels.arch import layers, names
from sparsekernels.arch.sites import AddNormSite, AttentionSite, FFNSite, RMSNormSite


class StructureError(ValueError):
    """The model map cannot describe part of a model; the message names the part."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _positive_int(obj, attrs) -> Optional[int]:
    if obj is None:
        return None
    for attr in attrs:
        value = getattr(obj, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def read_heads(*objects) -> Optional[int]:
    """The first positive integer head count among `objects`' head attributes."""
    for obj in objects:
        value = _positive_int(obj, names.HEAD_ATTRS)
        if value is not None:
            return value
    return None


def _width(module: nn.Module) -> int:
    """Output features of a weight layer (Linear, Conv1D, SparseLinear)."""
    if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2:
        return layers.out_features(module)
    value = getattr(module, "out_features", None)
    if isinstance(value, int):
        return value
    raise StructureError(f"{type(module).__name__} has no 2-D weight to read its width from")


# --- layers ------------------------------------------------------------------------------
def find_layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The ModuleLists of repeated blocks holding weight layers (encoder.layer, h, layers,
    block, ...), outermost first: [(list path, [layer paths])]."""
    found: list[tuple[str, list[str]]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(c) for c in m}) != 1 or not any(True for _ in m[0].parameters()):
            continue
        if not any(layers.type_name(x) in ("Linear", "Conv1D") or hasattr(x, "values")
                   and hasattr(x, "crow_indices") for x in m[0].modules()):
            continue
        if any(name.startswith(f + ".") for f, _ in found):
            continue  # a list inside a layer (T5's block.N.layer)
        found.append((name, [_join(name, str(i)) for i in range(len(m))]))
    return found


def layer_linears(model: nn.Module, types=("Linear", "Conv1D")) -> list[str]:
    """The weight layers of `types` inside the layers find_layers finds (attention and FFN
    projections of every encoder / decoder layer; never an embedding, pooler or head), in
    module order. Empty when the model has no such layers."""
    found = []
    for _, layer_paths in find_layers(model):
        for layer in layer_paths:
            for name, module in model.get_submodule(layer).named_modules():
                if layers.type_name(module) in types:
                    found.append(_join(layer, name))
    return found


def _layer_index(model: nn.Module) -> list[str]:
    return [path for _, paths in find_layers(model) for path in paths]


def _layer_of(path: str, layer_paths: list[str]) -> Optional[str]:
    best = None
    for lp in layer_paths:
        if (path == lp or path.startswith(lp + ".")) and (best is None or len(lp) > len(best)):
            best = lp
    return best


# --- attention ---------------------------------------------------------------------------
def _projections(name: str, children: dict, parent_name: str, modules: dict):
    """(q, k, v, o, qkv_layout) of an attention module, or None."""
    for qn, kn, vn in names.QKV_CHILDREN:
        if not all(c in children for c in (qn, kn, vn)):
            continue
        o = next((c for c in names.OUTPUT_CHILDREN if c in children), None)
        if o is not None:
            o_name = _join(name, o)
        else:
            if not name:
                continue
            o_name = _join(parent_name, ".".join(names.OUTPUT_SIBLING))
            if o_name not in modules:
                continue
        return _join(name, qn), _join(name, kn), _join(name, vn), o_name, "separate"
    if any(c in children for c in names.NOT_FUSED_QKV):
        return None
    fused = next((c for c in names.FUSED_QKV_CHILDREN if c in children), None)
    o = next((c for c in names.OUTPUT_CHILDREN if c in children), None)
    if fused is None or o is None:
        return None
    f = _join(name, fused)
    return f, f, f, _join(name, o), names.FUSED_QKV_CHILDREN[fused]


def projection_children(module: nn.Module) -> dict[str, str]:
    """The child names of an attention module's own projections: "q", "k", "v" (separate
    projections only) and "o" when the output projection is a child. Empty when none."""
    children = dict(module.named_children())
    found: dict[str, str] = {}
    for triple in names.QKV_CHILDREN:
        if all(c in children for c in triple):
            found = dict(zip("qkv", triple))
            break
    o = next((c for c in names.OUTPUT_CHILDREN if c in children), None)
    if found and o is not None:
        found["o"] = o
    return found


def _head_sizes(name: str, module: nn.Module, parent, config, modules: dict,
                q: str, k: str, layout: str) -> tuple[int, int, int]:
    """(heads, kv heads, head dim): widths over the head dim when the module keeps one (it
    does not change when heads are removed), else the head-count attributes."""
    head_dim = _positive_int(module, names.HEAD_DIM_ATTRS)
    heads_attr = read_heads(module, parent, config)
    kv_attr = None
    for obj in (module, parent, config):
        kv_attr = kv_attr or _positive_int(obj, names.KV_HEAD_ATTRS)
    if layout == "separate":
        q_width, k_width = _width(modules[q]), _width(modules[k])
        if head_dim is None:
            if heads_attr is None:
                raise StructureError(
                    f"attention block {name!r}: cannot read the number of heads; set one of "
                    f"{', '.join(names.HEAD_ATTRS)} on the module or model.config")
            if q_width % heads_attr:
                raise StructureError(f"attention block {name!r}: projection width {q_width} is "
                                     f"not a multiple of {heads_attr} heads")
            head_dim = q_width // heads_attr
        for what, width in (("query", q_width), ("key", k_width)):
            if width % head_dim:
                raise StructureError(f"attention block {name!r}: {what} width {width} is not a "
                                     f"multiple of the head size {head_dim}")
        return q_width // head_dim, k_width // head_dim, head_dim
    total = _width(modules[q])
    if heads_attr is None:
        raise StructureError(
            f"attention block {name!r}: cannot read the number of heads of the fused QKV "
            f"projection; set one of {', '.join(names.HEAD_ATTRS)} on the module or config")
    kv = kv_attr or heads_attr
    if head_dim is None:
        if total % (heads_attr + 2 * kv):
            raise StructureError(f"attention block {name!r}: fused QKV width {total} does not "
                                 f"split into {heads_attr} query and 2 x {kv} key/value heads")
        head_dim = total // (heads_attr + 2 * kv)
    if total % head_dim:
        raise StructureError(f"attention block {name!r}: fused QKV width {total} is not a "
                             f"multiple of the head size {head_dim}")
    heads = total // head_dim - 2 * kv
    if heads <= 0:
        raise StructureError(f"attention block {name!r}: fused QKV width {total} leaves no "
                             f"query heads beside 2 x {kv} key/value heads of size {head_dim}")
    return heads, kv, head_dim


def _rotary_dims(model: nn.Module, head_dim: int) -> int:
    if not any(type(m).__name__.endswith(names.ROTARY_CLASS_SUFFIX) for m in model.modules()):
        return 0
    config = getattr(model, "config", None)
    factor = None
    for attr in names.PARTIAL_ROTARY_ATTRS:
        factor = getattr(config, attr, None)
        if factor is None:
            factor = (getattr(config, "rope_parameters", None) or {}).get(attr) \
                if isinstance(getattr(config, "rope_parameters", None), dict) else None
        if factor is not None:
            break
    dims = int(head_dim * float(factor)) if factor is not None else head_dim
    return dims - dims % 2


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every attention block of `model`, in named_modules order."""
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    layer_paths = _layer_index(model)
    rotary = None
    sites = []
    for name, module in modules.items():
        children = dict(module.named_children())
        parent_name = name.rpartition(".")[0]
        found = _projections(name, children, parent_name, modules)
        if found is None:
            continue
        q, k, v, o, layout = found
        parent = modules.get(parent_name) if name else None
        heads, kv, head_dim = _head_sizes(name, module, parent, config, modules, q, k, layout)
        if heads % kv:
            raise StructureError(f"attention block {name!r}: {heads} query heads do not share "
                                 f"{kv} key/value heads evenly")
        q_norm = next((_join(name, c) for c in names.Q_NORM_CHILDREN if c in children), None)
        k_norm = next((_join(name, c) for c in names.K_NORM_CHILDREN if c in children), None)
        qk_norm = None
        if q_norm is not None:
            w = getattr(modules[q_norm], "weight", None)
            qk_norm = "head" if isinstance(w, torch.Tensor) and w.numel() == head_dim else "width"
        leaf = name.rpartition(".")[2]
        cross = leaf in names.CROSS_ATTENTION_NAMES or bool(
            getattr(module, "is_cross_attention", False))
        if rotary is None:
            rotary = _rotary_dims(model, head_dim)
        sites.append(AttentionSite(
            name, q, k, v, o, heads, kv, head_dim, layout, q_norm, k_norm, qk_norm, cross,
            0 if cross else min(rotary, head_dim), _layer_of(name, layer_paths)))
    return sites


# --- FFN ---------------------------------------------------------------------------------
def activation_name(act) -> Optional[str]:
    """The kernels' name for an activation module or function, None if it has none."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if isinstance(act, nn.SiLU) or act is torch.nn.functional.silu:
        return "silu"
    if act is torch.nn.functional.gelu:
        return "gelu"
    if act is torch.nn.functional.relu or act is torch.relu:
        return "relu"
    return names.ACTIVATION_CLASSES.get(type(act).__name__)


def _resolve(modules: dict, owner: str, rel: str):
    path = _join(owner, rel)
    if path in modules:
        return path
    return None


def _attribute(model_modules: dict, owner: str, rel: str):
    """(owner path, attribute) of `rel` under `owner` when it exists (module or value)."""
    parent_rel, _, attr = rel.rpartition(".")
    parent = _join(owner, parent_rel) if parent_rel else owner
    module = model_modules.get(parent)
    if module is None or not hasattr(module, attr):
        return None
    return parent, attr


def _is_weight_layer(module: nn.Module) -> bool:
    return layers.type_name(module) in ("Linear", "Conv1D") or hasattr(module, "crow_indices")


def find_ffn(model: nn.Module) -> list[FFNSite]:
    """Every FFN the patterns of arch.names describe, in named_modules order."""
    modules = dict(model.named_modules())
    layer_paths = _layer_index(model)
    sites = []
    for name in modules:
        for pattern in names.FFN_PATTERNS:
            up = _resolve(modules, name, pattern.up)
            down = _resolve(modules, name, pattern.down)
            gate = _resolve(modules, name, pattern.gate) if pattern.gate else None
            act = _attribute(modules, name, pattern.act)
            if up is None or down is None or act is None or (pattern.gate and gate is None):
                continue
            if not (_is_weight_layer(modules[up]) and _is_weight_layer(modules[down])):
                continue
            units = _width(modules[up]) // (2 if pattern.gate_up_fused else 1)
            act_value = getattr(modules[act[0]], act[1])
            dropout = _attribute(modules, name, pattern.dropout) if pattern.dropout else None
            sites.append(FFNSite(name, up, down, units, gate, pattern.gate_up_fused, act,
                                 activation_name(act_value), dropout,
                                 _layer_of(name, layer_paths)))
            break
    return sites


# --- post-norm residual blocks -----------------------------------------------------------
def find_add_norm(model: nn.Module) -> list[AddNormSite]:
    """Every module the patterns of arch.names.ADD_NORM_PATTERNS describe: a weight layer, a
    dropout and a LayerNorm over the layer's width as its children. What its forward computes
    is not read here: nn.add_norm checks that on a probe before it changes anything."""
    modules = dict(model.named_modules())
    layer_paths = _layer_index(model)
    sites = []
    for name in modules:
        for pattern in names.ADD_NORM_PATTERNS:
            parts = [_resolve(modules, name, rel) for rel in (pattern.dense, pattern.dropout,
                                                                pattern.norm)]
            if None in parts:
                continue
            dense, dropout, norm = (modules[p] for p in parts)
            if not (_is_weight_layer(dense) and isinstance(dropout, nn.Dropout)
                    and isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
                    and norm.normalized_shape[0] == _width(dense)):
                continue
            sites.append(AddNormSite(name, *parts, _layer_of(name, layer_paths)))
            break
    return sites


# --- RMS norms -------------------------------------------------------------------------------
def find_rms_norms(model: nn.Module) -> list[RMSNormSite]:
    """Every RMS norm (a model's own *RMSNorm class or torch.nn.RMSNorm) with a 1-D weight and
    an epsilon attribute; norms narrowed by a hidden-dim resize (which normalise over more
    features than they keep) are left out. What the forward computes is not read here:
    nn.rms_norm checks that on a probe."""
    layer_paths = _layer_index(model)
    sites = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (layers.type_name(module) != "RMSNorm" or getattr(module, "_sparsekernels_pruned", False)
                or not isinstance(weight, torch.Tensor) or weight.dim() != 1):
            continue
        eps_attr = next((a for a in names.RMS_NORM_EPS_ATTRS if hasattr(module, a)), None)
        if eps_attr is None:
            continue
        cls = type(module).__name__
        offset = cls in names.RMS_NORM_OFFSET_CLASSES
        round_normed = not offset and cls not in names.RMS_NORM_FP32_PRODUCT_CLASSES
        sites.append(RMSNormSite(name, offset, round_normed, eps_attr,
                                 _layer_of(name, layer_paths)))
    return sites
