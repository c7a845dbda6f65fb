"""Module surgery: shrink a layer to kept rows / columns / channels, in place.

One job: change the shape of one module (and the attributes its forward reads) while
keeping its class, so transformers code that checks isinstance still works. Every
function records what it did as a plain dict (`Change`) that `restore_structure` can
replay on a freshly built model before loading the saved weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekernels.arch import layers, names

Change = dict[str, Any]


class ParamCache:
    """Replaces parameters once per (parameter, new shape), so tied weights stay tied."""

    def __init__(self):
        self._new: dict[tuple[int, tuple], nn.Parameter] = {}

    def replace(self, module: nn.Module, attr: str, value: torch.Tensor) -> None:
        old = getattr(module, attr)
        key = (id(old), tuple(value.shape))
        if key not in self._new:
            self._new[key] = nn.Parameter(value.detach().clone().contiguous(),
                                          requires_grad=old.requires_grad)
        setattr(module, attr, self._new[key])


def _index(keep: torch.Tensor | None, size: int, device) -> torch.Tensor:
    return torch.arange(size, device=device) if keep is None else keep.to(device)


def shrink_weight_layer(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None,
                        cache: ParamCache) -> Change:
    """Keep canonical rows (outputs) and columns (inputs) of a Linear, Conv1D, Conv2d or
    Embedding. Embedding's canonical view is [dim, vocab]: rows are its embedding channels."""
    kind = layers.type_name(module)
    w = module.weight
    out_f, in_f = layers.canonical_shape(module)[:2]
    r = _index(rows, out_f, w.device)
    c = _index(cols, in_f, w.device)
    canonical = layers.to_canonical(module, w.detach())
    new_w = layers.from_canonical(module, canonical.index_select(0, r).index_select(1, c))
    cache.replace(module, "weight", new_w)
    if layers.has_bias(module):
        cache.replace(module, "bias", module.bias.detach().index_select(0, r))
    n_out, n_in = len(r), len(c)
    attrs: dict[str, int] = {}
    if kind == "Linear" or isinstance(module, nn.Linear):
        attrs = {"out_features": n_out, "in_features": n_in}
    elif kind == "Conv1D":
        attrs = {"nf": n_out, "nx": n_in}
    elif kind in ("Conv2d", "Conv1d"):
        attrs = {"out_channels": n_out, "in_channels": n_in}
    elif kind == "Embedding":
        attrs = {"embedding_dim": n_out, "num_embeddings": n_in}
    for name, value in attrs.items():
        if hasattr(module, name):
            setattr(module, name, value)
    return {"op": "weight_layer", "weight": list(module.weight.shape),
            "bias": list(module.bias.shape) if layers.has_bias(module) else None, "attrs": attrs}


def add_bias(module: nn.Module, cache: ParamCache) -> Change:
    """Give a bias-free Linear / Conv1D a zero bias (to fold a constant into)."""
    out_f = layers.out_features(module)
    module.bias = nn.Parameter(module.weight.new_zeros(out_f), requires_grad=module.weight.requires_grad)
    return {"op": "add_bias", "bias": [out_f]}


def shrink_param(module: nn.Module, attr: str, keep: torch.Tensor, cache: ParamCache) -> Change:
    """Keep entries of a free parameter's last dim (ViT's cls_token, position embeddings)."""
    value = getattr(module, attr).detach()
    cache.replace(module, attr, value.index_select(-1, keep.to(value.device)))
    return {"op": "param", "attr": attr, "shape": list(getattr(module, attr).shape)}


# --- norms that still normalise over the original width ------------------------------------
_PRUNED_NORM_CLASSES: dict[type, type] = {}


def _pruned_layer_norm_forward(self, x):
    # The removed channels were exactly zero: they add nothing to the sums, but the mean and
    # variance of the original layer were taken over `virtual_features` channels.
    h = float(self.virtual_features)
    xf = x.float()
    mean = xf.sum(-1, keepdim=True) / h
    centered = xf - mean
    missing = h - x.shape[-1]
    var = (centered.pow(2).sum(-1, keepdim=True) + missing * mean.pow(2)) / h
    y = centered * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        y = y * self.weight.float()
    if self.bias is not None:
        y = y + self.bias.float()
    return y.to(x.dtype)


def _pruned_rms_norm_forward(self, x):
    h = float(self.virtual_features)
    variance = x.float().pow(2).sum(-1, keepdim=True) / h
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    y = x * torch.rsqrt(variance + eps)
    if self.weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(self.weight.dtype)
    return self.weight * y


def pruned_norm_class(cls: type, rms: bool) -> type:
    """A subclass of a norm class whose forward normalises over `virtual_features`.
    rms: the norm divides by the root mean square (T5LayerNorm, RMSNorm) and has no mean."""
    if getattr(cls, "_sparsekernels_pruned", False):
        return cls
    if cls not in _PRUNED_NORM_CLASSES:
        forward = _pruned_rms_norm_forward if rms else _pruned_layer_norm_forward
        _PRUNED_NORM_CLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,),
                                         {"forward": forward, "_sparsekernels_pruned": True})
    return _PRUNED_NORM_CLASSES[cls]


def shrink_norm(module: nn.Module, keep: torch.Tensor, cache: ParamCache) -> Change:
    """Keep channels of a LayerNorm / RMS norm whose removed inputs are always zero."""
    virtual = int(getattr(module, "virtual_features", module.weight.shape[0]))
    for attr in ("weight", "bias"):
        p = getattr(module, attr, None)
        if isinstance(p, torch.Tensor):
            cache.replace(module, attr, p.detach().index_select(0, keep.to(p.device)))
    rms = not hasattr(module, "normalized_shape")  # nn.LayerNorm has it; T5LayerNorm does not
    module.__class__ = pruned_norm_class(type(module), rms)
    module.virtual_features = virtual
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (len(keep),)
    return {"op": "norm", "size": len(keep), "virtual": virtual}


def set_head_count(module: nn.Module, old_heads: int, new_heads: int, head_dim: int) -> Change:
    """Update the head-count attributes an attention forward reads (names vary by family)."""
    attrs = {}
    for name in names.HEAD_ATTRS:
        if getattr(module, name, None) == old_heads:
            attrs[name] = new_heads
    for name in names.HEAD_WIDTH_ATTRS:
        if getattr(module, name, None) == old_heads * head_dim:
            attrs[name] = new_heads * head_dim
    for name, value in attrs.items():
        setattr(module, name, value)
    return {"op": "heads", "attrs": attrs}


# --- replay ---------------------------------------------------------------------------------
def restore_structure(model: nn.Module, structure: dict[str, list[Change]]) -> None:
    """Give a freshly built model the shapes recorded by a speedup, before loading weights."""
    from sparsekernels.nn.sparse_linear import SparseLinear

    cache = ParamCache()  # a parameter shared by several modules (tied) stays shared
    fuse = False  # FFNs are fused once every SparseLinear exists

    def empty(module, attr, shape):
        cache.replace(module, attr, getattr(module, attr).detach().new_empty(shape))

    for name, changes in structure.items():
        for change in changes:
            module = model.get_submodule(name)
            op = change["op"]
            if op == "weight_layer":
                empty(module, "weight", change["weight"])
                if change["bias"] is not None:
                    empty(module, "bias", change["bias"])
                for attr, value in change["attrs"].items():
                    setattr(module, attr, value)
            elif op == "add_bias":
                module.bias = nn.Parameter(module.weight.new_zeros(change["bias"]))
            elif op == "param":
                empty(module, change["attr"], change["shape"])
            elif op == "norm":
                shrink_norm(module, torch.arange(change["size"]), cache)
                module.virtual_features = change["virtual"]
            elif op == "heads":
                for attr, value in change["attrs"].items():
                    setattr(module, attr, value)
            elif op == "attention_layout":
                enable_head_layouts(model, {name: change})
            elif op == "t5_heads":
                install_head_subset(module, change["kept"], change["total"])
            elif op == "sparse_linear":
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                grid = (change["out_features"] // change["block_size"][0],
                        change["in_features"] // change["block_size"][1])
                sparse = SparseLinear(change["in_features"], change["out_features"],
                                      tuple(change["block_size"]), bias=change["bias"],
                                      block_mask=torch.zeros(grid, dtype=torch.bool),
                                      backend=change.get("backend", "auto"))
                setattr(parent, child, sparse)
            elif op == "fuse_ffn":
                fuse = True
            else:
                raise ValueError(f"unknown structure change {op!r} for {name!r}: this file was "
                                 "written by a newer sparsekernels")
    if fuse:
        from sparsekernels.nn.sparse_ffn import fuse_ffn_

        fuse_ffn_(model)


# --- T5: one relative position bias shared by every layer -----------------------------------
def install_head_subset(module: nn.Module, kept: list[int], total: int) -> Change:
    """Let a head-pruned T5 attention use its own heads of the shared position bias.

    T5 computes the relative position bias [batch or 1, heads, q, k] once (first layer) and
    hands the same tensor to every later layer (transformers 4.x also folds the attention
    mask into it), so a layer with fewer heads must take its own heads from it and pass a
    bias with every head on. A pre-hook slices the incoming bias; `compute_bias` is wrapped
    for the layer that computes it; a post-hook hands the next layer a full-head bias.
    Works on transformers 4.x and 5.x alike (4.x's own `pruned_heads` is not used: it
    assumes every layer prunes the same heads).
    """
    # a buffer, so `model.to(device)` moves it with the model (no copy per forward)
    module.register_buffer("_sk_head_index", torch.tensor(kept, dtype=torch.long),
                           persistent=False)
    first = kept[0]
    compute = module.compute_bias

    def compute_bias(*args, **kwargs):
        full = compute(*args, **kwargs)
        module._sk_computed_bias = full
        return full[:, module._sk_head_index]

    def pre_hook(mod, args, kwargs):
        mod._sk_incoming_bias = None
        bias = kwargs.get("position_bias")
        if bias is not None and bias.shape[1] == total:
            mod._sk_incoming_bias = bias
            kwargs = dict(kwargs, position_bias=bias[:, mod._sk_head_index])
        return args, kwargs

    def post_hook(mod, args, kwargs, output):
        incoming = getattr(mod, "_sk_incoming_bias", None)
        computed = getattr(mod, "_sk_computed_bias", None)
        mod._sk_incoming_bias = mod._sk_computed_bias = None
        if not (isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor)):
            return output
        returned = output[1]
        if incoming is not None:
            full = incoming  # it already had every head (and the mask, on 4.x)
        elif computed is not None:
            # returned = computed[kept] (+ a mask shared by all heads, on 4.x): add the same
            # difference to every head; exact where the mask is 0, stays masked elsewhere
            full = computed + (returned[:, :1] - computed[:, first:first + 1])
        else:  # a layer without relative bias made zeros (+ mask) with its own head count
            full = returned[:, :1].expand(returned.shape[0], total, *returned.shape[2:])
        return (output[0], full) + tuple(output[2:])

    module.compute_bias = compute_bias
    module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    module.register_forward_hook(post_hook, with_kwargs=True)
    return {"op": "t5_heads", "kept": list(kept), "total": total}


def enable_head_layouts(model: nn.Module, changes: dict[str, Change]) -> None:
    """Run the named attention modules through the block-sparse op with the recorded head
    masks as layouts (pruned heads: all-false rows). Modules not named stay dense."""
    from sparsekernels.attention import enable_, head_mask_layout

    existing = {}
    for module_name, module in model.named_modules():
        config = getattr(module, "_sparsekernels_attention", None)
        if config is not None and config.layout is not None:
            existing[module_name] = config.layout
    for name, change in changes.items():
        keep = torch.tensor(change["keep"], dtype=torch.bool)
        existing[name] = head_mask_layout(keep, change["seq_len"], change["seq_len"],
                                          tuple(change["block_size"]))
    enable_(model, layouts=existing, block_size=tuple(next(iter(changes.values()))["block_size"]))
