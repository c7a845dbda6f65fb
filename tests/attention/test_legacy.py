"""sparsekernels.attention.legacy: the transformers 4.x attention classes enable_ patches
(BERT, RoBERTa, T5 on 4.57) equal eager on what only they take (BERT's relative position
scores, head_mask, transformers' own prune_heads), swap classes reversibly, and leave other
versions of those classes alone. Caches, cross attention, padding, resized heads and
gradients are covered per family in test_integration.py, on 4.x and 5.x alike."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparsekernels.attention as sa  # noqa: E402
from sparsekernels.attention import legacy  # noqa: E402

LEGACY = int(transformers.__version__.split(".")[0]) < 5
needs_4x = pytest.mark.skipif(not LEGACY, reason="transformers 5 has no hand-written BERT / T5 "
                                                 "attention classes to patch (nor head_mask, "
                                                 "prune_heads or relative_key scores)")
B, L = 2, 37
BLOCK = (16, 16)


def _mask():
    m = torch.ones(B, L, dtype=torch.long)
    m[1, 30:] = 0
    return m


def bert(**extra):
    cfg = transformers.BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                  intermediate_size=128, vocab_size=100,
                                  max_position_embeddings=64, **extra)
    return transformers.BertModel(cfg), dict(input_ids=torch.randint(0, 100, (B, L)),
                                              attention_mask=_mask())


def t5():
    cfg = transformers.T5Config(d_model=64, d_kv=16, num_heads=4, num_layers=2,
                                num_decoder_layers=2, d_ff=128, vocab_size=100,
                                decoder_start_token_id=0, pad_token_id=1,
                                attn_implementation="eager")
    return transformers.T5Model(cfg), dict(input_ids=torch.randint(0, 100, (B, L)),
                                           attention_mask=_mask(),
                                           decoder_input_ids=torch.randint(0, 100, (B, 21)))


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _dropout_off(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model


@needs_4x
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_patch_swaps_the_class_reversibly(attn_implementation):
    model, inputs = bert(attn_implementation=attn_implementation)
    model.eval()
    originals = [type(m) for _, m in sa.attention_modules(model)]
    assert originals and all(legacy.can_patch(m) for _, m in sa.attention_modules(model))
    keys = list(model.state_dict())
    sparse = sa.enable_(copy.deepcopy(model), block_size=BLOCK)
    sa.enable_(sparse, block_size=BLOCK)  # twice: still one subclass deep
    mods = [m for _, m in sa.attention_modules(sparse)]
    assert [type(m).__bases__[0] for m in mods] == originals
    assert all(isinstance(m, cls) for m, cls in zip(mods, originals))
    assert list(sparse.state_dict()) == keys
    assert all(legacy.is_patched(m) for _, m in sa.attention_modules(copy.deepcopy(sparse)))
    sa.disable_(sparse)
    assert [type(m) for _, m in sa.attention_modules(sparse)] == originals


@needs_4x
@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
def test_bert_relative_position_scores_equal_eager(kind):
    """Added to the scores as an additive float mask; its gradient reaches the distance
    embedding (and, for relative_key_query, the keys)."""
    model, inputs = bert(attn_implementation="eager", position_embedding_type=kind)
    _dropout_off(model.train())
    sparse = sa.enable_(copy.deepcopy(model), block_size=BLOCK)
    keep = inputs["attention_mask"].bool()
    want, got = model(**inputs).last_hidden_state[keep], sparse(**inputs).last_hidden_state[keep]
    assert max_rel_err(got, want) <= 1e-4
    weight = torch.randn_like(want)
    (want * weight).sum().backward()
    (got * weight).sum().backward()
    name = "encoder.layer.0.attention.self.distance_embedding.weight"
    g_want = dict(model.named_parameters())[name].grad
    g_got = dict(sparse.named_parameters())[name].grad
    assert g_want.abs().sum() > 0
    assert (g_got - g_want).abs().max() <= 1e-4 * g_want.abs().max()


@needs_4x
@pytest.mark.parametrize("family", ["bert", "t5"])
def test_head_mask_equals_eager(family):
    model, inputs = bert(attn_implementation="eager") if family == "bert" else t5()
    model.eval()
    head_mask = torch.rand(2, 4)
    head_mask[0, 1] = 0.0
    if family == "t5":
        inputs = dict(inputs, head_mask=head_mask, decoder_head_mask=head_mask.flip(0),
                      cross_attn_head_mask=head_mask)
    else:
        inputs = dict(inputs, head_mask=head_mask)
    sparse = sa.enable_(copy.deepcopy(model), block_size=BLOCK)
    with torch.no_grad():
        assert max_rel_err(sparse(**inputs).last_hidden_state,
                           model(**inputs).last_hidden_state) <= 1e-4


@needs_4x
def test_head_mask_per_key_is_refused():
    model, _ = bert(attn_implementation="eager")
    sparse = sa.enable_(copy.deepcopy(model).eval(), block_size=BLOCK)
    attention = sparse.encoder.layer[0].attention.self
    with pytest.raises(ValueError, match="head_mask"):
        attention(torch.randn(B, L, 64), head_mask=torch.ones(1, 4, 1, L))


@needs_4x
@pytest.mark.parametrize("family", ["bert", "t5"])
def test_transformers_prune_heads_then_layouts(family):
    """transformers' own prune_heads leaves layers with different head counts (T5 keeps the
    shared position bias with every head and slices it): layouts follow each module."""
    model, inputs = bert(attn_implementation="eager") if family == "bert" else t5()
    model.eval()
    if family == "bert":
        model.prune_heads({0: [1], 1: [0, 3]})
    else:  # (4.57's T5Model.prune_heads looks for encoder.layer): the modules' own
        for block, heads in zip(model.encoder.block, ([1], [0, 3])):
            block.layer[0].SelfAttention.prune_heads(heads)
    heads = [getattr(m, "num_attention_heads", None) or m.n_heads
             for _, m in sa.attention_modules(model)]
    assert heads[:2] == [3, 2]
    sparse = sa.enable_(copy.deepcopy(model), block_size=BLOCK)
    with torch.no_grad():
        assert max_rel_err(sparse(**inputs).last_hidden_state,
                           model(**inputs).last_hidden_state) <= 1e-4
    with pytest.raises(ValueError, match="heads"):
        sa.enable_(copy.deepcopy(model), layouts=torch.ones(4, 3, 3, dtype=torch.bool))


@needs_4x
def test_t5_output_attentions_is_refused():
    model, inputs = t5()
    sparse = sa.enable_(copy.deepcopy(model).eval(), block_size=BLOCK)
    with pytest.raises(ValueError, match="output_attentions.*disable_"):
        sparse(**inputs, output_attentions=True)


def test_other_versions_of_a_patched_class_are_left_alone():
    """Same module and class name, another forward (another transformers release): not
    patched, and a model made only of such modules is refused by name."""

    class BertSelfAttention(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None):
            return hidden_states

    BertSelfAttention.__module__ = "transformers.models.bert.modeling_bert"
    module = BertSelfAttention()
    assert not legacy.can_patch(module)
    with pytest.raises(TypeError, match="not a transformers 4.x attention class"):
        legacy.patch_(module)
    with pytest.raises(RuntimeError, match="BERT, RoBERTa, T5"):
        sa.enable_(torch.nn.Sequential(module))
