"""Run a transformers model's attention through sparsekernels::block_sparse_attention.

transformers 5 (and the 4.x models that call `ALL_ATTENTION_FUNCTIONS`) looks the attention
function up by `config._attn_implementation`. `register()` adds ours under the name
"sparsekernels" to `AttentionInterface` (and the SDPA-style bool mask to
`AttentionMaskInterface`), so `from_pretrained(..., attn_implementation="sparsekernels")`
works once sparsekernels.attention is imported; `enable_(model, layouts)` attaches one layout
per attention module and switches the model over. On transformers 4.x, the models whose
attention classes compute attention by hand (BERT, RoBERTa, T5 on 4.57) have those modules
patched by `enable_` instead (`sparsekernels.attention.legacy`); there the name works only
through `enable_`, not at construction. `disable_` undoes either.

Supported and tested: BERT, RoBERTa, GPT-2 (causal), BART (encoder, causal decoder, cross
attention), T5 (its relative position bias is added per block as an additive mask, with its
gradient) and ViT, on transformers 5 and 4.57. A model whose attention modules neither call
the attention interface nor are classes `legacy` patches raises a clear error instead of
silently running dense.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from sparsekernels.attention.layouts import crop, grid
from sparsekernels.ops.limits import check_block_size

IMPLEMENTATION = "sparsekernels"
_ATTR = "_sparsekernels_attention"


@dataclasses.dataclass(eq=False)
class SparseAttentionConfig:
    """What one attention module runs: its layout (None: every block), block size, backend,
    and the precision of fp32 products (`set_fp32_precision_`; see the op's fp32_precision).
    The layout is not a module buffer, so it follows `model.to(device)` on the next forward
    (moved once, then kept there)."""

    layout: Optional[Tensor] = None
    block_size: tuple[int, int] = (64, 64)
    backend: str = "auto"
    fp32_precision: str = "ieee"

    def layout_for(self, heads: int, lq: int, lk: int, device) -> Tensor:
        nq, nk = grid(lq, lk, self.block_size)
        if self.layout is None:
            return _dense(heads, nq, nk, device)
        if self.layout.device != device:
            self.layout = self.layout.to(device)
        lay = self.layout
        if lay.shape[-3] != heads:
            raise ValueError(f"the layout has {lay.shape[-3]} heads, the attention module "
                             f"{heads}: build one layout row per head")
        return crop(lay, nq, nk)


_DENSE_CACHE: dict = {}


def _dense(heads: int, nq: int, nk: int, device) -> Tensor:
    key = (heads, nq, nk, str(device))
    lay = _DENSE_CACHE.get(key)
    if lay is None:
        lay = torch.ones(heads, nq, nk, dtype=torch.bool, device=device)
        if len(_DENSE_CACHE) < 256:
            _DENSE_CACHE[key] = lay
    return lay


def refuse_output_attentions(output_attentions) -> None:
    if output_attentions:
        raise ValueError("attn_implementation='sparsekernels' does not return attention "
                         "probabilities: for output_attentions=True run the model without it "
                         "(sparsekernels.attention.disable_(model), or attn_implementation="
                         "'eager')")


def attend(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
           mask: Optional[Tensor], causal: bool, scale: Optional[float],
           dropout: float, window: Optional[int] = None) -> Tensor:
    """One attention module's block-sparse attention with its layout (dense if it has none):
    query [B, H, Lq, D], key/value [B, Hkv, Lk, D] (Hkv divides H), mask bool or additive ->
    [B, H, Lq, D]. The queries are the last Lq key positions (causal, window: see the op)."""
    from sparsekernels.ops.block_sparse_attention import block_sparse_attention

    cfg: SparseAttentionConfig = getattr(module, _ATTR, None) or SparseAttentionConfig()
    layout = cfg.layout_for(query.shape[1], query.shape[2], key.shape[2], query.device)
    return block_sparse_attention(query, key, value, layout, cfg.block_size, attn_mask=mask,
                                  causal=causal, scale=scale,
                                  dropout_p=dropout if module.training else 0.0,
                                  backend=cfg.backend, window=window,
                                  fp32_precision=cfg.fp32_precision)


def sparsekernels_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor,
                                    value: Tensor, attention_mask: Optional[Tensor],
                                    dropout: float = 0.0, scaling: Optional[float] = None,
                                    is_causal: Optional[bool] = None,
                                    position_bias: Optional[Tensor] = None, **kwargs):
    """The attention function transformers calls (the `sdpa_attention_forward` contract):
    query [B, H, Lq, D], key/value [B, Hkv, Lk, D] -> ([B, Lq, H, D], None)."""
    refuse_output_attentions(kwargs.get("output_attentions", False))
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='sparsekernels' does not support softcap")
    lq, lk = query.shape[2], key.shape[2]  # key/value may have fewer heads (the op groups them)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    # as in transformers' SDPA path: a mask, when given, already holds the causal pattern
    causal = bool(is_causal) and lq > 1 and attention_mask is None
    if causal and lk > lq:
        # prefill into an empty static cache (the only unmasked causal case with more keys):
        # the slots past the queries are empty; transformers' SDPA path drops them the same way
        key, value, lk = key[:, :, :lq], value[:, :, :lq], lq
        if position_bias is not None:
            position_bias = position_bias[..., :lq]
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != lk:
        mask = mask[..., :lk]
    if position_bias is not None:  # T5: the relative position bias is an additive mask
        bias = position_bias[..., -lk:] if position_bias.shape[-1] != lk else position_bias
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias + mask
    # the window (transformers' sliding_window: the keys p - window < j <= p, or |p - j| < window
    # bidirectional) is in the mask too; passing it lets the kernel skip blocks outside it
    out = attend(module, query, key, value, mask, causal, scaling, dropout,
                 window=kwargs.get("sliding_window"))
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "sparsekernels" with transformers' attention (and mask) interfaces."""
    try:
        from transformers import AttentionInterface
    except ImportError as exc:  # transformers < 4.48
        raise RuntimeError(
            "sparsekernels.attention needs transformers with AttentionInterface (>= 4.48): "
            f"{exc}; upgrade with `pip install -U 'transformers>=4.48'`") from None
    AttentionInterface.register(IMPLEMENTATION, sparsekernels_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return  # transformers 4.x builds its masks per model: the 4-D additive mask works
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _calls_attention_interface(module: torch.nn.Module) -> bool:
    return _class_calls_attention_interface(type(module))


@functools.lru_cache(maxsize=None)
def _class_calls_attention_interface(cls: type) -> bool:  # source read once per class
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


def unsupported(module: torch.nn.Module) -> Optional[str]:
    """Why the block-sparse op cannot run this attention module exactly, or None."""
    from sparsekernels.arch import names

    for attr in names.SOFTCAP_ATTRS:
        if getattr(module, attr, None):
            return (f"it soft-caps its attention scores ({attr}={getattr(module, attr)}), "
                    "which the block-sparse kernels do not")
    return None


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every attention site of the model map that can run the block-sparse
    op (it dispatches through transformers' attention interface, or is a transformers 4.x
    attention class `enable_` patches), in model order: the layers `enable_`'s `layouts` are
    indexed by."""
    from sparsekernels.arch import find_attention
    from sparsekernels.attention import legacy

    found = []
    for site in find_attention(model):
        module = model.get_submodule(site.name)
        if _calls_attention_interface(module) or legacy.can_patch(module):
            found.append((site.name, module))
    return found


_UNSUPPORTED_HINT = (
    "its attention modules neither call transformers' AttentionInterface nor are transformers "
    "4.57 classes that sparsekernels patches (BERT, RoBERTa, T5): upgrade transformers "
    "(>= 5.0, or 4.57 for those families)")


def _set_implementation(model: torch.nn.Module, name: str, legacy_only: bool) -> None:
    # transformers 4.x refuses (with a warning) to switch a model with hand-written attention
    # classes; their patched modules ignore the name, the config still records it
    if hasattr(model, "set_attn_implementation") and not legacy_only:
        model.set_attn_implementation(name)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            if config._attn_implementation != name:
                try:
                    config._attn_implementation = name
                except Exception:
                    config._attn_implementation_internal = name


LayoutsArg = Union[None, Tensor, Sequence[Optional[Tensor]], Mapping[str, Optional[Tensor]]]


def enable_(model: torch.nn.Module, layouts: LayoutsArg = None, block_size=(64, 64),
            backend: str = "auto") -> torch.nn.Module:
    """Make `model` run its attention through sparsekernels::block_sparse_attention, in place.

    layouts: None (every block: output equal to the eager model), one bool layout
    [heads, nq, nk] for every attention module, a sequence with one per attention module
    (None entries stay dense), or a mapping from module name to layout. A layout built for
    the longest sequence serves shorter ones (its top-left corner is used).
    On transformers 4.x, BERT / RoBERTa / T5 attention modules are patched (see
    `sparsekernels.attention.legacy`). Returns the model.
    """
    from sparsekernels.arch import find_attention
    from sparsekernels.attention import legacy

    register()
    mods = attention_modules(model)
    if not mods:
        raise RuntimeError(f"sparsekernels.attention.enable_: {type(model).__name__} has no "
                           f"attention module to run sparse; {_UNSUPPORTED_HINT}")
    block_size = check_block_size(block_size)  # refused here, not at the first forward
    for name, module in mods:
        why = unsupported(module)
        if why is not None:
            raise ValueError(f"sparsekernels.attention.enable_: {name}: {why}; leave this model's "
                             "attention as it is (its Linear layers can still run sparse)")
    names = [n for n, _ in mods]
    if layouts is None or isinstance(layouts, Tensor):
        per_module = [layouts] * len(mods)
    elif isinstance(layouts, Mapping):
        unknown = sorted(set(layouts) - set(names))
        if unknown:
            raise KeyError(f"no attention module named {unknown}; attention modules: {names}")
        per_module = [layouts.get(n) for n in names]
    else:
        per_module = list(layouts)
        if len(per_module) != len(mods):
            raise ValueError(f"got {len(per_module)} layouts for {len(mods)} attention modules "
                             f"({names}); pass one per module, or a dict by name")
    device = next(iter(model.parameters()), torch.empty(0)).device
    sites = {site.name: site for site in find_attention(model)}
    for (name, module), layout in zip(mods, per_module):
        if layout is not None:
            if (not isinstance(layout, Tensor) or layout.dtype != torch.bool
                    or layout.dim() not in (3, 4)):
                raise ValueError(f"{name}: a layout is a bool [heads, nq, nk] tensor, got "
                                 f"{getattr(layout, 'dtype', type(layout).__name__)} "
                                 f"{list(getattr(layout, 'shape', []))}")
            layout = layout.to(device)  # once here, not on every forward
            heads = sites[name].num_heads
            if layout.shape[-3] != heads:
                raise ValueError(f"{name}: layout has {layout.shape[-3]} heads, the module "
                                 f"{heads}")
        setattr(module, _ATTR, SparseAttentionConfig(layout, block_size, backend))
    patched = [legacy.patch_(m) for _, m in mods if legacy.can_patch(m)]
    _set_implementation(model, IMPLEMENTATION, legacy_only=len(patched) == len(mods))
    return model


def set_fp32_precision_(model: torch.nn.Module, precision: str,
                        names: Optional[Sequence[str]] = None) -> list[str]:
    """Set the precision of fp32 products ("ieee", "bf16" or "int8", see
    block_sparse_attention's fp32_precision) on the attention modules `enable_` configured
    (all, or those in `names`, each of which must be one); returns their names. ModelSpeedup
    sets its attention_fp32_precision.
    "ieee" also gives their int8 projections back the input's dtype (bf16_projections_)."""
    from sparsekernels.ops.block_sparse_attention import FP32_PRECISIONS

    if precision.__class__ is not str or precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    configured = {n: m for n, m in model.named_modules() if getattr(m, _ATTR, None) is not None}
    if names is not None:
        missing = sorted(set(names) - set(configured))
        if missing:
            raise ValueError(f"{missing}: not attention modules running sparsekernels' "
                             "attention; call sparsekernels.attention.enable_(model) first")
        configured = {n: configured[n] for n in names}
    for module in configured.values():
        getattr(module, _ATTR).fp32_precision = precision
    if precision == "ieee":
        for _, projections in _int8_projections(model, set(configured)):
            for layer in projections.values():
                layer.set_output_dtype(None)
    return list(configured)


def _int8_projections(model: torch.nn.Module, names: set):
    """(site, {name: QuantizedSparseLinear}) for the attention sites in `names` whose q, k, v
    and o projections are all int8 layers."""
    from sparsekernels.arch import find_attention
    from sparsekernels.nn.quantized_sparse_linear import QuantizedSparseLinear

    for site in find_attention(model):
        if site.name not in names:
            continue
        layers = {n: model.get_submodule(n) for n in (site.q, site.k, site.v, site.o)}
        if all(type(m) is QuantizedSparseLinear for m in layers.values()):
            yield site, layers


def bf16_projections_(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """On a float32 model whose attention runs sparsekernels' op with bf16 or int8 products
    (set_fp32_precision_(model, "bf16" / "int8")), let each attention's int8 projections carry
    that rounding: q, k and v (QuantizedSparseLinear) write bf16 -- the products would round
    them to bf16 (or int8) anyway, so the attention reads half the bytes and writes its output
    in bf16 -- and o reads the bf16 output and writes float32 (the residual stream's dtype).
    Left alone: sites whose q / k pass through other float ops before attention (rotary
    embeddings, query / key norms), decoders and cross-attention (a cache keeps k / v in the
    model's dtype), attention modules transformers 4.x runs through a patched forward, and
    sites with any projection not a QuantizedSparseLinear. Returns {projection: out_dtype}."""
    from sparsekernels.ops.block_sparse_attention import LOW_PRECISIONS

    if next((p.dtype for p in model.parameters() if p.is_floating_point()),
            None) is not torch.float32:
        return {}
    low_sites = {n for n, m in model.named_modules()
                 if getattr(getattr(m, _ATTR, None), "fp32_precision", None) in LOW_PRECISIONS}
    chosen: dict[str, torch.dtype] = {}
    for site, layers in _int8_projections(model, low_sites):
        module = model.get_submodule(site.name)
        if (site.rotary_dims or site.qk_norm or site.cross or getattr(module, "is_causal", False)
                or not _calls_attention_interface(module)):
            continue
        for name, layer in layers.items():  # (a fused q / k / v module: one name)
            chosen[name] = torch.float32 if name == site.o else torch.bfloat16
            layer.set_output_dtype(chosen[name])
    return chosen


def disable_(model: torch.nn.Module, attn_implementation: str = "eager") -> torch.nn.Module:
    """Undo `enable_`: drop the layouts, give patched transformers 4.x attention modules their
    own forward back and switch the model to `attn_implementation`. Returns the model."""
    from sparsekernels.attention import legacy

    mods = attention_modules(model)
    for _, module in mods:
        if hasattr(module, _ATTR):
            delattr(module, _ATTR)
        legacy.unpatch_(module)
    legacy_only = bool(mods) and all(legacy.can_patch(m) for _, m in mods)
    _set_implementation(model, attn_implementation, legacy_only)
    return model
