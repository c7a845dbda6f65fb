"""Tiny random models of every supported family, their dummy inputs, and mask builders."""

from __future__ import annotations

import torch
import transformers as tf

from sparsekernels.arch import layers
from sparsekernels.arch import find_channel_groups
from sparsekernels.arch import find_attention

FAMILIES = ["bert", "roberta", "gpt2", "bart", "t5", "vit"]
# decoder LLMs: grouped-query attention, gated MLPs, RMSNorm, rotary embeddings
LLM_FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "phi3"]


def _llm_config(family: str):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=8), tf.MistralForCausalLM
    if family == "qwen2":  # biases on Q, K, V
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if family == "gemma2":  # head size 32, not 64 / 8; GeGLU; tied embeddings; soft-capping
        cfg = dict(common, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   sliding_window=8, query_pre_attn_scalar=32)
        return tf.Gemma2Config(**cfg), tf.Gemma2ForCausalLM
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**common), tf.Phi3ForCausalLM
    raise ValueError(family)


def build(family: str):
    """(model in eval mode, dummy_input dict) with random weights."""
    ids = torch.randint(3, 96, (2, 12))
    attn = torch.ones(2, 12, dtype=torch.long)
    attn[1, 9:] = 0  # a padded row
    common = dict(vocab_size=96)
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                            num_hidden_layers=2, max_position_embeddings=32, **common)
        return tf.BertForSequenceClassification(cfg).eval(), {"input_ids": ids, "attention_mask": attn}
    if family == "roberta":
        cfg = tf.RobertaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                               num_hidden_layers=2, max_position_embeddings=40, **common)
        return tf.RobertaForSequenceClassification(cfg).eval(), {"input_ids": ids, "attention_mask": attn}
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=32, bos_token_id=1,
                            eos_token_id=2, **common)
        return tf.GPT2LMHeadModel(cfg).eval(), {"input_ids": ids}
    if family == "bart":
        cfg = tf.BartConfig(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                            encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2,
                            decoder_layers=2, max_position_embeddings=32, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **common)
        return tf.BartForConditionalGeneration(cfg).eval(), {
            "input_ids": ids, "attention_mask": attn, "decoder_input_ids": ids[:, :7]}
    if family == "t5":
        cfg = tf.T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                          num_decoder_layers=2, feed_forward_proj="gated-gelu",
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **common)
        return tf.T5ForConditionalGeneration(cfg).eval(), {
            "input_ids": ids, "attention_mask": attn, "decoder_input_ids": ids[:, :7]}
    if family == "vit":
        cfg = tf.ViTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                           num_hidden_layers=2, image_size=32, patch_size=8, num_labels=5)
        return tf.ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    if family in LLM_FAMILIES:
        cfg, cls = _llm_config(family)
        cfg._attn_implementation = "eager"
        return cls(cfg).eval(), {"input_ids": ids, "attention_mask": attn}
    raise ValueError(family)


def _full(model, name, param="weight"):
    return torch.ones_like(getattr(model.get_submodule(name), param))


def _add(masks, model, name, param, fn):
    entry = masks.setdefault(name, {})
    mask = entry.get(param, _full(model, name, param))
    module = model.get_submodule(name)
    if param == "weight":
        canonical = layers.to_canonical(module, mask).clone()
        fn(canonical)
        entry[param] = layers.from_canonical(module, canonical)
    else:
        fn(mask)
        entry[param] = mask


def head_masks(model, per_block: int = 1, via: str = "all"):
    """Mask `per_block` random head units of every attention block (a head, or a key/value
    group with its query heads under grouped-query attention): Q, K, V rows and O columns
    (via="all"), only V rows (via="value") or only O columns (via="output")."""
    masks: dict = {}
    for block in find_attention(model):
        members = block.head_members()
        units = members[0][2].shape[0]
        for unit in torch.randperm(units)[:per_block].tolist():
            for name, dim, index in members:
                idx = index[unit]
                if dim == 1:  # O columns
                    if via in ("all", "output"):
                        _add(masks, model, name, "weight", lambda w: w.index_fill_(1, idx, 0))
                    continue
                if via == "output":
                    continue
                if via == "value":  # only the V rows of this module
                    v_rows = block.rows("v")[unit]
                    idx = idx[torch.isin(idx, v_rows.reshape(-1))]
                    if name != block.v or idx.numel() == 0:
                        continue
                _add(masks, model, name, "weight", lambda w: w.index_fill_(0, idx, 0))
                if layers.has_bias(model.get_submodule(name)):
                    _add(masks, model, name, "bias", lambda b: b.index_fill_(0, idx, 0))
    return masks


def _groups(model, dummy):
    blocks = find_attention(model)
    owned = set()
    for b in blocks:
        owned |= {(b.q, "out"), (b.k, "out"), (b.v, "out"), (b.o, "in")}
    return [g for g in find_channel_groups(model, dummy)
            if not ({(m.name, m.kind) for m in g.members} & owned)]


def ffn_masks(model, dummy, kind: str, fraction: float = 0.3):
    """Mask a random fraction of every FFN's units: producer rows (kind="row") or consumer
    columns (kind="column")."""
    masks: dict = {}
    for g in _groups(model, dummy):
        if any(m.kind in ("norm", "param") for m in g.members):
            continue
        mods = {m.name: model.get_submodule(m.name) for m in g.members}
        if any(layers.type_name(mods[m.name]) == "Embedding" for m in g.members):
            continue
        consumers = [m for m in g.members if m.kind == "in"]
        producers = [m for m in g.members if m.kind == "out"]
        if not consumers or not producers or "classifier" in consumers[0].name or "pooler" in producers[0].name:
            continue
        drop = torch.randperm(g.size)[: int(fraction * g.size)]
        targets = producers[:1] if kind == "row" else consumers
        for m in targets:
            idx = m.index.view(-1)[drop]
            if kind == "row":
                _add(masks, model, m.name, "weight", lambda w: w.index_fill_(0, idx, 0))
            else:
                _add(masks, model, m.name, "weight", lambda w: w.index_fill_(1, idx, 0))
    return masks


def hidden_masks(model, dummy, fraction: float = 0.25):
    """Mask a random fraction of hidden channels on every producer of the residual stream.
    Free parameters on the stream (ViT's cls_token, position embeddings) are zeroed in the
    model itself (masks only address module parameters)."""
    masks: dict = {}
    for g in _groups(model, dummy):
        if not any(m.kind in ("norm", "param") for m in g.members):
            continue
        drop = torch.randperm(g.size)[: int(fraction * g.size)]
        for m in g.members:
            idx = m.index.view(-1)[drop]
            if m.kind == "out":
                _add(masks, model, m.name, "weight", lambda w: w.index_fill_(0, idx, 0))
                if layers.has_bias(model.get_submodule(m.name)):
                    _add(masks, model, m.name, "bias", lambda b: b.index_fill_(0, idx, 0))
            elif m.kind == "norm":
                for p in ("weight", "bias"):
                    if isinstance(getattr(model.get_submodule(m.name), p, None), torch.Tensor):
                        _add(masks, model, m.name, p, lambda t: t.index_fill_(0, idx, 0))
            elif m.kind == "param":
                owner, _, attr = m.name.rpartition(".")
                with torch.no_grad():
                    getattr(model.get_submodule(owner), attr)[..., idx] = 0
    return masks


def block_masks(model, block=(16, 16), density=0.5):
    """Random block masks on every Linear / Conv1D whose shape the block divides."""
    masks: dict = {}
    for name, module in model.named_modules():
        if layers.type_name(module) not in ("Linear", "Conv1D"):
            continue
        out_f, in_f = layers.canonical_shape(module)
        if out_f % block[0] or in_f % block[1]:
            continue
        grid = torch.rand(out_f // block[0], in_f // block[1]) < density
        if not grid.any():  # a wholly pruned layer can zero the output (no relative error)
            grid.view(-1)[torch.randint(grid.numel(), ())] = True
        mask = grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1).float()
        masks[name] = {"weight": layers.from_canonical(module, mask)}
    return masks


def merge(*mask_dicts):
    out: dict = {}
    for md in mask_dicts:
        for name, entry in md.items():
            for p, m in entry.items():
                prev = out.setdefault(name, {}).get(p)
                out[name][p] = m if prev is None else prev * m
    return out


def apply_masks(model, masks):
    with torch.no_grad():
        for name, entry in masks.items():
            module = model.get_submodule(name)
            for p, m in entry.items():
                getattr(module, p).mul_(m)
    return model


def output_of(model, dummy):
    out = model(**dummy)
    return out.logits if hasattr(out, "logits") else out[0]
