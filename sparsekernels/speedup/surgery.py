"""Module surgery: shrink a layer to kept rows / columns / channels, in place.

One job: change the shape of one module (and the attributes its forward reads) while
keeping its class, so transformers code that checks isinstance still works. Every
function records what it did as a plain dict (`Change`) that `restore_structure` can
replay on a freshly built model before loading the saved weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from sparsekernels.arch import layers, names
from sparsekernels.ops.block_sparse_attention import FP32_PRECISIONS
from sparsekernels.ops.precision import INT8_SCHEMES

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
    # As the RMS norms of T5 and the Llama family compute (float32 statistics), over the
    # original width; Gemma's norms scale by (1 + weight).
    h = float(self.virtual_features)
    variance = x.float().pow(2).sum(-1, keepdim=True) / h
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    y = x.float() * torch.rsqrt(variance + eps)
    if type(self)._sparsekernels_offset:
        return (y * (1.0 + self.weight.float())).type_as(x)
    if self.weight.dtype in (torch.float16, torch.bfloat16):
        return self.weight * y.to(self.weight.dtype)
    return self.weight * y.to(x.dtype)


def pruned_norm_class(cls: type, rms: bool) -> type:
    """A subclass of a norm class whose forward normalises over `virtual_features`.
    rms: the norm divides by the root mean square (T5LayerNorm, RMSNorm) and has no mean."""
    if getattr(cls, "_sparsekernels_pruned", False):
        return cls
    if cls not in _PRUNED_NORM_CLASSES:
        forward = _pruned_rms_norm_forward if rms else _pruned_layer_norm_forward
        _PRUNED_NORM_CLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,), {
            "forward": forward, "_sparsekernels_pruned": True,
            "_sparsekernels_offset": cls.__name__ in names.RMS_NORM_OFFSET_CLASSES})
    return _PRUNED_NORM_CLASSES[cls]


def shrink_norm(module: nn.Module, keep: torch.Tensor, cache: ParamCache) -> Change:
    """Keep channels of a LayerNorm / RMS norm whose removed inputs are always zero."""
    virtual = int(getattr(module, "virtual_features", module.weight.shape[0]))
    for attr in ("weight", "bias"):
        p = getattr(module, attr, None)
        if isinstance(p, torch.Tensor):
            cache.replace(module, attr, p.detach().index_select(0, keep.to(p.device)))
    rms = layers.type_name(module) != "LayerNorm"  # T5LayerNorm and the RMSNorms: no mean
    module.__class__ = pruned_norm_class(type(module), rms)
    module.virtual_features = virtual
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (len(keep),)
    return {"op": "norm", "size": len(keep), "virtual": virtual}


def set_head_count(module: nn.Module, site, new_heads: int, new_kv_heads: int) -> Change:
    """Update the head counts an attention forward reads (attribute names vary by family):
    query heads, key/value heads, the group size, heads x head size. A forward that reads
    them from the model config (Phi-3) gets a config of its own, so layers may differ."""
    old_h, old_kv, d = site.num_heads, site.num_kv_heads, site.head_dim
    wanted = {}
    for attr in names.HEAD_ATTRS:
        wanted[attr] = (old_h, new_heads)
    for attr in names.KV_HEAD_ATTRS:
        wanted[attr] = (old_kv, new_kv_heads)
    for attr in names.KV_GROUP_ATTRS:
        wanted[attr] = (old_h // old_kv, new_heads // new_kv_heads)
    for attr in names.HEAD_WIDTH_ATTRS:
        wanted[attr] = (old_h * d, new_heads * d)
    attrs = {a: new for a, (old, new) in wanted.items() if getattr(module, a, None) == old}
    for attr, value in attrs.items():
        setattr(module, attr, value)
    config_attrs = {}
    config = getattr(module, "config", None)
    if config is not None:
        config_attrs = {a: new for a, (old, new) in wanted.items()
                        if a in names.HEAD_ATTRS + names.KV_HEAD_ATTRS
                        and getattr(config, a, None) == old and old != new}
        if config_attrs:
            _own_config(module, config_attrs)
    return {"op": "heads", "attrs": attrs, "config": config_attrs}


def _own_config(module: nn.Module, attrs: dict) -> None:
    module.config = copy.copy(module.config)
    for attr, value in attrs.items():
        setattr(module.config, attr, value)


# --- replay ---------------------------------------------------------------------------------
# The attributes a recorded change may set: the ones the functions above write, nothing else
# (a record is replayed from a file, and setattr with a name from a file could replace any
# attribute, a method included).
WEIGHT_LAYER_ATTRS = ("out_features", "in_features", "nf", "nx", "out_channels", "in_channels",
                      "embedding_dim", "num_embeddings")
HEAD_ATTRS = names.HEAD_ATTRS + names.KV_HEAD_ATTRS + names.KV_GROUP_ATTRS + names.HEAD_WIDTH_ATTRS
CONFIG_HEAD_ATTRS = names.HEAD_ATTRS + names.KV_HEAD_ATTRS  # what set_head_count copies a config for


def _is_int(value, low: int = 0) -> bool:
    return type(value) is int and value >= low  # JSON true / false are not counts


def _is_shape(value, dims=None) -> bool:
    return (isinstance(value, list) and all(_is_int(v) for v in value)
            and (dims is None or len(value) == dims))


def _check_change(model: nn.Module, name: str, change) -> None:
    """Raise ValueError unless one recorded change is well formed and fits the module."""
    from sparsekernels.formats.block_sparse import SUPPORTED_BLOCK_SIZES
    from sparsekernels.ops.backend import Backend

    def fail(message: str):
        op = change.get("op") if isinstance(change, dict) else None
        raise ValueError(f"structure entry {name!r}" + (f" ({op})" if op else "") + f": {message}")

    if not isinstance(change, dict) or not isinstance(change.get("op"), str):
        fail(f'each change must be an object with an "op" string, got {change!r:.80}')
    op = change["op"]
    if op not in _CHANGE_FIELDS:
        fail(f"unknown structure change {op!r}: this file was written by a newer sparsekernels, "
             "or is damaged")
    for field, (check, what) in _CHANGE_FIELDS[op].items():
        if not check(change.get(field)):
            fail(f"field {field!r} must be {what}, got {change.get(field)!r:.80}")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        fail(f"the model has no module {name!r}: was the record written for another model?")
    if op == "decode_linear" and not isinstance(module, nn.Linear):
        fail(f"only an nn.Linear runs the decode GEMV, this module is {type(module).__name__}")
    if op == "fuse_add_norm" and not any(isinstance(c, nn.LayerNorm) for c in module.children()):
        fail(f"{type(module).__name__} holds no LayerNorm: it is not a post-norm block")
    if op == "rms_norm" and layers.type_name(module) != "RMSNorm":
        fail(f"{type(module).__name__} is not an RMS norm")
    if op == "attention_precision":
        from sparsekernels.attention import attention_modules

        if all(m is not module for _, m in attention_modules(model)):
            fail(f"{type(module).__name__} is not an attention module sparsekernels can run")
    allowed = {"weight_layer": WEIGHT_LAYER_ATTRS, "heads": HEAD_ATTRS}.get(op, ())
    for attr in change.get("attrs", {}) if allowed else ():
        if attr not in allowed:
            fail(f"cannot set attribute {attr!r} of {type(module).__name__} (this change sets "
                 f"only {allowed})")
    for attr in change.get("config") or {} if op == "heads" else ():
        if attr not in CONFIG_HEAD_ATTRS:
            fail(f"cannot set config attribute {attr!r} (this change sets only "
                 f"{CONFIG_HEAD_ATTRS})")
        if getattr(module, "config", None) is None:
            fail(f"records config head counts, but {type(module).__name__} has no config")
    weight = getattr(module, "weight", None)
    if op in ("weight_layer", "add_bias", "norm") and not isinstance(weight, torch.Tensor):
        fail(f"{type(module).__name__} has no weight tensor")
    if op == "weight_layer":
        if len(change["weight"]) != weight.dim():
            fail(f"weight shape {change['weight']} has {len(change['weight'])} dims, the "
                 f"module's weight {weight.dim()}")
        if change["bias"] is not None and not isinstance(getattr(module, "bias", None), torch.Tensor):
            fail(f"records a bias, but {type(module).__name__} has none")
    elif op == "param":
        if change["attr"] not in dict(module.named_parameters(recurse=False)):
            fail(f"{type(module).__name__} has no parameter {change['attr']!r}")
        if len(change["shape"]) != getattr(module, change["attr"]).dim():
            fail(f"shape {change['shape']} does not have the parameter's number of dims")
    elif op == "norm":
        if change["size"] > weight.shape[0] or change["virtual"] < change["size"]:
            fail(f"size {change['size']} / virtual {change['virtual']} do not fit a norm of "
                 f"{weight.shape[0]} channels")
    elif op == "t5_heads":
        kept, total = change["kept"], change["total"]
        if not kept or sorted(set(kept)) != kept or kept[-1] >= total:
            fail(f"kept heads {kept} must be sorted, distinct and below total {total}")
        if not callable(getattr(module, "compute_bias", None)):
            fail(f"{type(module).__name__} is not a T5 attention (no compute_bias)")
    elif op == "sparse_linear":
        bm, bk = change["block_size"]
        if bm not in SUPPORTED_BLOCK_SIZES or bk not in SUPPORTED_BLOCK_SIZES:
            fail(f"block size {(bm, bk)} is not supported ({SUPPORTED_BLOCK_SIZES})")
        if change["out_features"] % bm or change["in_features"] % bk:
            fail(f"block size {(bm, bk)} does not divide [{change['out_features']}, "
                 f"{change['in_features']}]")
        Backend.parse(change.get("backend", "auto"))
        if name == "":
            fail("cannot replace the model itself")
    elif op in ("attention_layout", "attention_kernel"):
        if any(b <= 0 for b in change["block_size"]):
            fail(f"block size {change['block_size']} must be positive")


def _attrs(allowed_values=_is_int):
    return lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and allowed_values(x) for k, x in v.items())


_SHAPE = (_is_shape, "a list of non-negative ints")
_CHANGE_FIELDS: dict[str, dict] = {
    "weight_layer": {"weight": _SHAPE,
                     "bias": (lambda v: v is None or _is_shape(v, 1), "null or a 1-item list"),
                     "attrs": (_attrs(), "an object of non-negative ints")},
    "add_bias": {"bias": (lambda v: _is_shape(v, 1), "a 1-item list of ints")},
    "param": {"attr": (lambda v: isinstance(v, str), "a string"), "shape": _SHAPE},
    "norm": {"size": (lambda v: _is_int(v, 1), "a positive int"),
             "virtual": (lambda v: _is_int(v, 1), "a positive int")},
    "heads": {"attrs": (_attrs(), "an object of non-negative ints"),
              "config": (lambda v: v is None or _attrs()(v), "null or an object of ints")},
    "attention_layout": {
        "keep": (lambda v: isinstance(v, list) and v and all(type(x) is bool for x in v),
                 "a non-empty list of booleans"),
        "seq_len": (lambda v: _is_int(v, 1), "a positive int"),
        "block_size": (lambda v: _is_shape(v, 2), "a list of two ints")},
    "t5_heads": {"kept": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
                          "a list of head indices"),
                 "total": (lambda v: _is_int(v, 1), "a positive int")},
    "sparse_linear": {
        "in_features": (lambda v: _is_int(v, 1), "a positive int"),
        "out_features": (lambda v: _is_int(v, 1), "a positive int"),
        "block_size": (lambda v: _is_shape(v, 2), "a list of two ints"),
        "bias": (lambda v: type(v) is bool, "true or false"),
        "backend": (lambda v: v is None or isinstance(v, str), "a backend name")},
    "attention_kernel": {"block_size": (lambda v: _is_shape(v, 2), "a list of two ints")},
    # after its module's attention_layout / attention_kernel: set on the config they install
    "attention_precision": {"fp32_precision": (lambda v: v in FP32_PRECISIONS,
                                               f"one of {FP32_PRECISIONS}")},
    "fuse_ffn": {},
    "quantize_int8": {"scheme": (lambda v: v is None or v in INT8_SCHEMES,
                                 f"absent or one of {', '.join(INT8_SCHEMES)}")},
    # after its module's quantize_int8
    "output_dtype": {"dtype": (lambda v: v in ("float32", "bfloat16"),
                               "float32 or bfloat16")},
    "decode_linear": {},
    "fuse_add_norm": {},
    "rms_norm": {},
}


def validate_structure(model: nn.Module, structure) -> None:
    """Raise ValueError unless `structure` ({module name: [change, ...]}, as ModelSpeedup
    records it) is well formed and every change fits `model`. restore_structure calls it
    before applying anything: a record is untrusted input (it comes from a file)."""
    if not isinstance(structure, dict):
        raise ValueError("the structure record must be an object {module name: [change, ...]}, "
                         f"got {type(structure).__name__}")
    for name, changes in structure.items():
        if not isinstance(changes, list):
            raise ValueError(f"structure entry {name!r} must be a list of changes, got "
                             f"{type(changes).__name__}")
        for change in changes:
            _check_change(model, name, change)
        # output_dtype sets an attribute of the QuantizedSparseLinear quantize_int8 makes
        ops = [c["op"] for c in changes]
        if "output_dtype" in ops and "quantize_int8" not in ops[:ops.index("output_dtype")]:
            raise ValueError(f"structure entry {name!r} (output_dtype): only an int8 layer "
                             "takes an output dtype; its quantize_int8 change must come first")
    # attention_precision sets what attention_layout / attention_kernel install (on every
    # attention module at once): it needs one of them
    ops = {c["op"] for changes in structure.values() for c in changes}
    if "attention_precision" in ops and not ops & {"attention_layout", "attention_kernel"}:
        raise ValueError("structure change attention_precision without an attention_layout "
                         "or attention_kernel change: no module would run sparsekernels' "
                         "attention")


def restore_structure(model: nn.Module, structure: dict[str, list[Change]]) -> None:
    """Give a freshly built model the shapes recorded by a speedup, before loading weights.
    Every change is checked (validate_structure) before any is applied."""
    from sparsekernels.nn.sparse_linear import SparseLinear

    validate_structure(model, structure)
    cache = ParamCache()  # a parameter shared by several modules (tied) stays shared
    fuse = False  # FFNs are fused once every SparseLinear exists
    decode: set[str] = set()  # Linears made DecodeLinear (after any dtype change)
    add_norm: set[str] = set()  # post-norm blocks on the fused add + LayerNorm
    rms: set[str] = set()  # RMS norms on the rms_norm op
    kernel_attention: dict[str, tuple[int, int]] = {}
    precision: dict[str, str] = {}  # attention fp32_precision, once every config exists

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
                if change.get("config"):
                    _own_config(module, change["config"])
            elif op == "attention_layout":
                enable_head_layouts(model, {name: change})
            elif op == "attention_kernel":  # once every shape is restored (reads the map)
                kernel_attention[name] = tuple(change["block_size"])
            elif op == "attention_precision":
                precision[name] = change["fp32_precision"]
            elif op == "t5_heads":
                install_head_subset(module, change["kept"], change["total"])
            elif op == "sparse_linear":
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                grid = (change["out_features"] // change["block_size"][0],
                        change["in_features"] // change["block_size"][1])
                old = getattr(module, "weight", None)  # keep the replaced layer's dtype
                sparse = SparseLinear(change["in_features"], change["out_features"],
                                      tuple(change["block_size"]), bias=change["bias"],
                                      block_mask=torch.zeros(grid, dtype=torch.bool),
                                      backend=change.get("backend", "auto"),
                                      dtype=old.dtype if isinstance(old, torch.Tensor)
                                      and old.is_floating_point() else None)
                setattr(parent, child, sparse)
            elif op == "quantize_int8":  # after its sparse_linear: same layout, int8 values
                from sparsekernels.nn.quantized_sparse_linear import apply_dtype_

                apply_dtype_(model, "int8", names={name}, scheme=change.get("scheme") or "auto")
            elif op == "output_dtype":  # after its quantize_int8 (validate_structure checked)
                module.set_output_dtype(getattr(torch, change["dtype"]))
            elif op == "fuse_ffn":
                fuse = True
            elif op == "decode_linear":
                decode.add(name)
            elif op == "fuse_add_norm":
                add_norm.add(name)
            elif op == "rms_norm":
                rms.add(name)
            else:  # validate_structure refused it already
                raise AssertionError(op)
    if kernel_attention:
        enable_attention_kernel(model, list(kernel_attention), next(iter(kernel_attention.values())))
    if precision:
        from sparsekernels.attention import set_fp32_precision_

        for name, value in precision.items():
            set_fp32_precision_(model, value, names=[name])
    if fuse:
        from sparsekernels.nn.sparse_ffn import fuse_ffn_

        fuse_ffn_(model)
    if decode:
        from sparsekernels.nn.decode_linear import decode_linears_

        decode_linears_(model, names=decode)
    if add_norm:
        from sparsekernels.nn.add_norm import fuse_add_norm_

        fuse_add_norm_(model, names=add_norm)
    if rms:
        from sparsekernels.nn.rms_norm import rms_norms_

        rms_norms_(model, names=rms)


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


def enable_attention_kernel(model: nn.Module, names: list[str], block_size) -> None:
    """Run the named attention modules through the block-sparse op with no layout (every
    block: the op picks the kernel or SDPA per call); layouts already installed stay."""
    from sparsekernels.attention import enable_

    configured = {n for n, m in model.named_modules()
                  if getattr(m, "_sparsekernels_attention", None) is not None}
    if not set(names) <= configured:
        enable_(model, layouts=_installed_layouts(model), block_size=block_size)


def _installed_layouts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The layouts the model's attention modules run now (modules without one left out)."""
    layouts = {}
    for name, module in model.named_modules():
        config = getattr(module, "_sparsekernels_attention", None)
        if config is not None and config.layout is not None:
            layouts[name] = config.layout
    return layouts


def enable_head_layouts(model: nn.Module, changes: dict[str, Change]) -> None:
    """Run the named attention modules through the block-sparse op with the recorded head
    masks as layouts (pruned heads: all-false rows). Modules not named stay dense."""
    from sparsekernels.attention import enable_, head_mask_layout

    existing = _installed_layouts(model)
    for name, change in changes.items():
        keep = torch.tensor(change["keep"], dtype=torch.bool)
        existing[name] = head_mask_layout(keep, change["seq_len"], change["seq_len"],
                                          tuple(change["block_size"]))
    enable_(model, layouts=existing, block_size=tuple(next(iter(changes.values()))["block_size"]))
