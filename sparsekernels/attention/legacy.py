"""transformers 4.x attention classes that compute attention by hand, patched to run
sparsekernels::block_sparse_attention.

On transformers 4.57, BERT and RoBERTa (`*SelfAttention`, `*SdpaSelfAttention`) and T5
(`T5Attention`) do not go through the attention interface, so `config._attn_implementation`
cannot route them. `patch_(module)` swaps such a module's class for a subclass whose forward
is one of the functions below: the same projections, cache handling, masks and outputs as
transformers' forward (4.57), with softmax(q k^T) v replaced by the block-sparse op and the
module's layout. `unpatch_` gives the original class back. A class is patched only when its
forward takes exactly the arguments these functions were written for; any other version of
it is left alone (and `enable_` reports it as unsupported).

Covered: key/value caches (`EncoderDecoderCache` included), cross attention, the decoder's
causal mask, BERT's relative_key / relative_key_query scores and T5's relative position
bias (both added to the scores as an additive float mask, with their gradients), T5's own
`pruned_heads`, per-head `head_mask` and attention dropout. Refused with an error that names
the way out: output_attentions=True (there are no probabilities to return) and a head_mask
with one factor per key. Not patched: the other 4.x families with hand-written attention
(Electra, XLM-RoBERTa, mT5, ...; each would be one more `_PATCHES` entry and its tests).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from sparsekernels.arch.find import projection_children
from sparsekernels.attention.integration import attend, refuse_output_attentions

_BERT_ARGS = ("self", "hidden_states", "attention_mask", "head_mask", "encoder_hidden_states",
              "past_key_values", "output_attentions", "cache_position")
_T5_ARGS = ("self", "hidden_states", "mask", "key_value_states", "position_bias",
            "past_key_values", "layer_head_mask", "query_length", "use_cache",
            "output_attentions", "cache_position")


def _keys_values(module, states: Tensor, past_key_values, is_cross: bool,
                 cache_position: Optional[Tensor], project: Callable[[Tensor], tuple]):
    """key and value [B, H, Lk, D] through the module's cache, as transformers 4.57 does."""
    from transformers.cache_utils import EncoderDecoderCache

    cache, is_updated = past_key_values, False
    if isinstance(past_key_values, EncoderDecoderCache):
        is_updated = past_key_values.is_updated.get(module.layer_idx)
        cache = (past_key_values.cross_attention_cache if is_cross
                 else past_key_values.self_attention_cache)
    if is_cross and past_key_values is not None and is_updated:  # cross k/v computed once
        layer = cache.layers[module.layer_idx]
        return layer.keys, layer.values
    key, value = project(states)
    if past_key_values is not None:
        key, value = cache.update(key, value, module.layer_idx,
                                  {"cache_position": None if is_cross else cache_position})
        if is_cross and isinstance(past_key_values, EncoderDecoderCache):
            past_key_values.is_updated[module.layer_idx] = True
    return key, value


def _apply_head_mask(out: Tensor, head_mask: Optional[Tensor]) -> Tensor:
    """transformers multiplies the probabilities by head_mask; a factor per (batch, head,
    query) moves through `probs @ v` unchanged, so it multiplies the output instead."""
    if head_mask is None:
        return out
    if head_mask.dim() > 4 or head_mask.shape[-1] != 1:
        raise ValueError(f"sparsekernels attention takes a head_mask with one factor per head "
                         f"(as get_head_mask builds), not one per key: got "
                         f"{list(head_mask.shape)}; drop head_mask or call "
                         "sparsekernels.attention.disable_(model)")
    return out * head_mask.to(out.dtype)


def _bert_relative_scores(module, query: Tensor, key: Tensor, cached: bool) -> Tensor:
    """BERT's relative_key(_query) position scores [B, H, Lq, Lk], before scaling."""
    lq, lk, device = query.shape[2], key.shape[2], query.device
    if cached:
        left = torch.tensor(lk - 1, dtype=torch.long, device=device).view(-1, 1)
    else:
        left = torch.arange(lq, dtype=torch.long, device=device).view(-1, 1)
    right = torch.arange(lk, dtype=torch.long, device=device).view(1, -1)
    emb = module.distance_embedding(left - right + module.max_position_embeddings - 1)
    emb = emb.to(dtype=query.dtype)
    scores = torch.einsum("bhld,lrd->bhlr", query, emb)
    if module.position_embedding_type == "relative_key_query":
        scores = scores + torch.einsum("bhrd,lrd->bhlr", key, emb)
    return scores


def bert_self_attention_forward(self, hidden_states: Tensor,
                                attention_mask: Optional[Tensor] = None,
                                head_mask: Optional[Tensor] = None,
                                encoder_hidden_states: Optional[Tensor] = None,
                                past_key_values=None, output_attentions: Optional[bool] = False,
                                cache_position: Optional[Tensor] = None, past_key_value=None):
    """BertSelfAttention / RobertaSelfAttention (and their SDPA subclasses), transformers 4.57."""
    refuse_output_attentions(output_attentions)
    if past_key_values is None:  # the name before 4.58
        past_key_values = past_key_value
    batch, lq, _ = hidden_states.shape
    heads, dim = self.num_attention_heads, self.attention_head_size

    def split(x: Tensor) -> Tensor:
        return x.view(batch, -1, heads, dim).transpose(1, 2)

    proj = {p: getattr(self, c) for p, c in self._sparsekernels_projections.items()}
    query = split(proj["q"](hidden_states))
    is_cross = encoder_hidden_states is not None
    key, value = _keys_values(self, encoder_hidden_states if is_cross else hidden_states,
                              past_key_values, is_cross, cache_position,
                              lambda x: (split(proj["k"](x)), split(proj["v"](x))))
    scale = 1.0 / math.sqrt(dim)
    mask = attention_mask
    if self.position_embedding_type in ("relative_key", "relative_key_query"):
        relative = _bert_relative_scores(self, query, key, past_key_values is not None) * scale
        mask = relative if mask is None else relative + mask
    # the SDPA class leaves an unmasked decoder's causal pattern to is_causal; eager never
    causal = (type(self)._sparsekernels_causal_unmasked and self.is_decoder and not is_cross
              and attention_mask is None and lq > 1)
    out = attend(self, query, key, value, mask, causal=causal, scale=scale,
                 dropout=self.dropout.p)
    out = _apply_head_mask(out, head_mask)
    return out.transpose(1, 2).reshape(batch, lq, heads * dim), None


def t5_attention_forward(self, hidden_states: Tensor, mask: Optional[Tensor] = None,
                         key_value_states: Optional[Tensor] = None,
                         position_bias: Optional[Tensor] = None, past_key_values=None,
                         layer_head_mask: Optional[Tensor] = None,
                         query_length: Optional[int] = None, use_cache: bool = False,
                         output_attentions: bool = False,
                         cache_position: Optional[Tensor] = None, past_key_value=None):
    """T5Attention, transformers 4.57: T5 does not scale the scores, and the relative position
    bias (with the attention mask folded in) is the op's additive mask. Returns
    (output, position_bias) like transformers, for the next layer to reuse."""
    refuse_output_attentions(output_attentions)
    if past_key_values is None:
        past_key_values = past_key_value
    batch, lq = hidden_states.shape[:2]
    heads, dim = self.n_heads, self.key_value_proj_dim

    def split(x: Tensor) -> Tensor:
        return x.view(batch, -1, heads, dim).transpose(1, 2)

    proj = {p: getattr(self, c) for p, c in self._sparsekernels_projections.items()}
    query = split(proj["q"](hidden_states))
    is_cross = key_value_states is not None
    key, value = _keys_values(self, key_value_states if is_cross else hidden_states,
                              past_key_values, is_cross, cache_position,
                              lambda x: (split(proj["k"](x)), split(proj["v"](x))))
    if position_bias is None:
        lk = key.shape[-2]
        if not self.has_relative_attention_bias:
            position_bias = torch.zeros((1, heads, lq, lk), device=query.device,
                                        dtype=query.dtype)
            if self.gradient_checkpointing and self.training:
                position_bias.requires_grad = True
        else:
            # cache_position is 0-indexed: + 1 gives the length with the past
            full = query_length if query_length is not None else cache_position[-1] + 1
            position_bias = self.compute_bias(full, lk, device=query.device,
                                              cache_position=cache_position)
            position_bias = position_bias[:, :, -lq:, :]
        if mask is not None:
            position_bias = position_bias + mask[:, :, :, :lk]
    bias = position_bias
    if self.pruned_heads:  # transformers' own prune_heads: the shared bias has every head
        keep = torch.ones(bias.shape[1], dtype=torch.bool, device=bias.device)
        keep[list(self.pruned_heads)] = False
        bias = bias[:, keep]
    out = attend(self, query, key, value, bias, causal=False, scale=1.0, dropout=self.dropout)
    out = _apply_head_mask(out, layer_head_mask)
    out = proj["o"](out.transpose(1, 2).reshape(batch, lq, heads * dim))
    return out, position_bias


# (module, class) -> (forward, its arguments, causal when a decoder gets no mask)
_PATCHES = {
    ("transformers.models.bert.modeling_bert", "BertSelfAttention"):
        (bert_self_attention_forward, _BERT_ARGS, False),
    ("transformers.models.bert.modeling_bert", "BertSdpaSelfAttention"):
        (bert_self_attention_forward, _BERT_ARGS, True),
    ("transformers.models.roberta.modeling_roberta", "RobertaSelfAttention"):
        (bert_self_attention_forward, _BERT_ARGS, False),
    ("transformers.models.roberta.modeling_roberta", "RobertaSdpaSelfAttention"):
        (bert_self_attention_forward, _BERT_ARGS, True),
    ("transformers.models.t5.modeling_t5", "T5Attention"): (t5_attention_forward, _T5_ARGS, False),
}
_PATCHED_CLASSES: dict[type, type] = {}


def _patch_for(cls: type):
    entry = _PATCHES.get((cls.__module__, cls.__qualname__))
    if entry is None:
        return None
    try:
        args = tuple(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return None
    return entry if args == entry[1] else None


def is_patched(module: torch.nn.Module) -> bool:
    return "_sparsekernels_original" in vars(type(module))


def can_patch(module: torch.nn.Module) -> bool:
    """Whether `module` is (or already runs as) a 4.x attention class patched here."""
    return is_patched(module) or _patch_for(type(module)) is not None


def patch_(module: torch.nn.Module) -> torch.nn.Module:
    """Run `module` through the block-sparse op (its class becomes a subclass with our
    forward; state, hooks and isinstance checks are unchanged). Idempotent."""
    if is_patched(module):
        return module
    cls = type(module)
    entry = _patch_for(cls)
    if entry is None:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a transformers 4.x "
                        "attention class sparsekernels can patch")
    if cls not in _PATCHED_CLASSES:
        forward, _, causal_unmasked = entry
        _PATCHED_CLASSES[cls] = type(f"Sparse{cls.__name__}", (cls,), {
            "forward": forward, "_sparsekernels_original": cls,
            "_sparsekernels_causal_unmasked": causal_unmasked, "__module__": __name__})
    # the projections' child names, as the model map reads them (once, not per forward;
    # names, not modules: kernel mode may swap a projection for a SparseLinear later)
    object.__setattr__(module, "_sparsekernels_projections", projection_children(module))
    module.__class__ = _PATCHED_CLASSES[cls]
    return module


def unpatch_(module: torch.nn.Module) -> torch.nn.Module:
    """Give a patched module its transformers class back (a no-op on any other module)."""
    if is_patched(module):
        module.__class__ = type(module)._sparsekernels_original
        module.__dict__.pop("_sparsekernels_projections", None)
    return module
