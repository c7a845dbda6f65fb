"""sparsekernels.attention.enable_ on tiny random transformers models: with all-true layouts
the output equals the eager model's (fp32, max relative error 1e-4), on every backend that can
run here; pruned-head layouts equal a model whose pruned heads output zeros; training
gradients (T5's relative position bias included) match eager."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparsekernels.attention as sa  # noqa: E402
from sparsekernels.ops import _ext  # noqa: E402
from sparsekernels.ops.backend import triton_available, triton_interpret  # noqa: E402

B, L, LD = 2, 37, 21  # sequence lengths that are not block multiples
BLOCK = (16, 16)


def need(backend):
    if backend == "cpu" and not _ext.has_op("block_sparse_attention", "cpu"):
        pytest.skip("compiled CPU extension without block_sparse_attention (make build)")
    if backend == "triton" and not (triton_available() and triton_interpret()):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


def _ids(n=L):
    return torch.randint(0, 100, (B, n))


def _right_padded():
    m = torch.ones(B, L, dtype=torch.long)
    m[1, 30:] = 0
    return m


def _left_padded():
    m = torch.ones(B, L, dtype=torch.long)
    m[1, :5] = 0
    return m


ENC = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
           vocab_size=100, attn_implementation="eager")


def bert():
    mask = _right_padded()
    return (transformers.BertModel(transformers.BertConfig(**ENC)),
            dict(input_ids=_ids(), attention_mask=mask),
            lambda o: o.last_hidden_state[mask.bool()])


def roberta():
    mask = _right_padded()
    return (transformers.RobertaModel(transformers.RobertaConfig(**ENC, pad_token_id=1)),
            dict(input_ids=_ids(), attention_mask=mask),
            lambda o: o.last_hidden_state[mask.bool()])


def gpt2():
    mask = _left_padded()
    cfg = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return (transformers.GPT2LMHeadModel(cfg), dict(input_ids=_ids(), attention_mask=mask),
            lambda o: o.logits[mask.bool()])


def gpt2_unpadded():
    cfg = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg), dict(input_ids=_ids()), lambda o: o.logits


SEQ2SEQ = dict(vocab_size=100, attn_implementation="eager", decoder_start_token_id=0,
               pad_token_id=1)


def bart():
    cfg = transformers.BartConfig(d_model=64, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_layers=2, decoder_layers=2,
                                  encoder_ffn_dim=128, decoder_ffn_dim=128, **SEQ2SEQ)
    return (transformers.BartModel(cfg),
            dict(input_ids=_ids(), attention_mask=_right_padded(), decoder_input_ids=_ids(LD)),
            lambda o: o.last_hidden_state)


def t5():
    cfg = transformers.T5Config(d_model=64, d_kv=16, num_heads=4, num_layers=2,
                                num_decoder_layers=2, d_ff=128, **SEQ2SEQ)
    return (transformers.T5Model(cfg),
            dict(input_ids=_ids(), attention_mask=_right_padded(), decoder_input_ids=_ids(LD)),
            lambda o: o.last_hidden_state)


def vit():
    cfg = transformers.ViTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                 intermediate_size=128, image_size=32, patch_size=4,
                                 attn_implementation="eager")
    return (transformers.ViTModel(cfg), dict(pixel_values=torch.randn(B, 3, 32, 32)),
            lambda o: o.last_hidden_state)


FAMILIES = {"bert": bert, "roberta": roberta, "gpt2": gpt2, "gpt2-unpadded": gpt2_unpadded,
            "bart": bart, "t5": t5, "vit": vit}
N_ATTENTION = {"bert": 2, "roberta": 2, "gpt2": 2, "gpt2-unpadded": 2, "bart": 6, "t5": 6,
               "vit": 2}


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# the Triton interpreter is slow: the two largest models run only in `make test-all`
SLOW_TRITON = {"bart", "t5"}
BACKEND_FAMILY = [pytest.param(b, f, marks=[pytest.mark.slow] if b == "triton" and f in SLOW_TRITON
                               else [], id=f"{f}-{b}")
                  for b in ("reference", "cpu", "triton") for f in FAMILIES]


@pytest.mark.parametrize("backend, family", BACKEND_FAMILY)
def test_all_true_layouts_equal_eager(family, backend):
    need(backend)
    model, inputs, pick = FAMILIES[family]()
    model.eval()
    sparse = sa.enable_(copy.deepcopy(model), block_size=BLOCK, backend=backend)
    assert len(sa.attention_modules(sparse)) == N_ATTENTION[family]
    assert sparse.config._attn_implementation == sa.IMPLEMENTATION
    with torch.no_grad():
        want = pick(model(**inputs))
        got = pick(sparse(**inputs))
    assert max_rel_err(got, want) <= 1e-4


# transformers 4.x builds BERT's attention module from a fixed {"eager", "sdpa"} table, so
# the name cannot select it at construction there (enable_ patches the built model instead)
LEGACY = int(transformers.__version__.split(".")[0]) < 5


@pytest.mark.parametrize("family", [
    pytest.param("bert", marks=pytest.mark.skipif(
        LEGACY, reason="transformers 4.x picks BERT's attention class at construction from "
                       "{eager, sdpa}: there enable_ patches the built model")),
    "gpt2"])
def test_attn_implementation_name_works_at_construction(family):
    model, inputs, pick = FAMILIES[family]()
    model.eval()
    cfg = copy.deepcopy(model.config)
    cfg._attn_implementation = "sparsekernels"
    other = type(model)(cfg).eval()
    other.load_state_dict(model.state_dict())
    assert other.config._attn_implementation == "sparsekernels"
    with torch.no_grad():
        assert max_rel_err(pick(other(**inputs)), pick(model(**inputs))) <= 1e-4


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_pruned_head_layout_equals_zeroed_head(backend):
    """A head with an all-false layout outputs zeros: the same as an eager model whose value
    projection for that head is zero."""
    need(backend)
    model, inputs, pick = bert()
    model.eval()
    head, dh = 2, 16
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in zeroed.encoder.layer:
            layer.attention.self.value.weight[head * dh:(head + 1) * dh] = 0
            layer.attention.self.value.bias[head * dh:(head + 1) * dh] = 0
    keep = torch.ones(4, dtype=torch.bool)
    keep[head] = False
    lay = sa.head_mask_layout(keep, 64, block_size=BLOCK)
    sparse = sa.enable_(copy.deepcopy(model), layouts=[lay, lay], block_size=BLOCK,
                        backend=backend)
    with torch.no_grad():
        assert max_rel_err(pick(sparse(**inputs)), pick(zeroed(**inputs))) <= 1e-4


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_training_gradients_equal_eager(family):
    model, inputs, pick = FAMILIES[family]()
    model.train()
    for m in model.modules():  # dropout off: the comparison is deterministic
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):  # T5Attention keeps a float
            m.dropout = 0.0
    sparse = sa.enable_(copy.deepcopy(model), block_size=BLOCK)
    out = pick(model(**inputs))
    weight = torch.randn_like(out)  # a loss with a non-degenerate gradient
    (out * weight).sum().backward()
    (pick(sparse(**inputs)) * weight).sum().backward()
    named = dict(sparse.named_parameters())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    top = max(g.abs().max().item() for g in grads.values())
    for name, want in grads.items():
        got = named[name].grad
        assert got is not None, name
        # relative to the tensor's own scale, floored for gradients that are ~0 in theory
        # (a key bias shifts every score of a row alike: softmax ignores it)
        scale = max(want.abs().max().item(), 1e-3 * top)
        assert (got - want).abs().max().item() <= 1e-4 * scale, name
    assert len(grads) > 10
    if family == "t5":  # the relative position bias learned through the additive mask
        assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.abs().sum() > 0


def test_sparse_layouts_per_layer_and_by_name():
    model, inputs, _ = gpt2()
    names = [n for n, _ in sa.attention_modules(model)]
    lays = {names[0]: sa.sliding_window_layout(4, 64, 16, BLOCK, causal=True)}
    sparse = sa.enable_(copy.deepcopy(model).eval(), layouts=lays, block_size=BLOCK)
    with torch.no_grad():
        out = sparse(**inputs).logits
    assert torch.isfinite(out).all()
    with pytest.raises(KeyError, match="no attention module named"):
        sa.enable_(copy.deepcopy(model), layouts={"nope": lays[names[0]]})
    with pytest.raises(ValueError, match="one per module"):
        sa.enable_(copy.deepcopy(model), layouts=[None])
    with pytest.raises(ValueError, match="heads"):
        sa.enable_(copy.deepcopy(model), layouts=torch.ones(3, 4, 4, dtype=torch.bool))


def test_unsupported_model_raises():
    with pytest.raises(RuntimeError, match="no attention module"):
        sa.enable_(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_output_attentions_is_refused():
    model, inputs, _ = bert()
    sparse = sa.enable_(copy.deepcopy(model).eval(), block_size=BLOCK)
    with pytest.raises(ValueError, match="output_attentions"):
        sparse(**inputs, output_attentions=True)


def test_disable_restores_the_model():
    model, inputs, pick = FAMILIES["t5"]()
    model.eval()
    classes = [type(m) for _, m in sa.attention_modules(model)]
    sparse = sa.enable_(copy.deepcopy(model), layouts=torch.zeros(4, 3, 3, dtype=torch.bool),
                        block_size=BLOCK)
    with torch.no_grad():
        assert max_rel_err(pick(sparse(**inputs)), pick(model(**inputs))) > 1e-2
        sa.disable_(sparse)
        assert [type(m) for _, m in sa.attention_modules(sparse)] == classes
        assert not any(hasattr(m, "_sparsekernels_attention") for m in sparse.modules())
        assert sparse.config._attn_implementation == "eager"
        assert max_rel_err(pick(sparse(**inputs)), pick(model(**inputs))) <= 1e-4
        assert sparse(**inputs, output_attentions=True).encoder_attentions[0] is not None


def bert_decoder(attn_implementation):
    cfg = transformers.BertConfig(**dict(ENC, attn_implementation=attn_implementation),
                                  is_decoder=True, add_cross_attention=True)
    enc, enc_mask = torch.randn(B, LD, 64), torch.ones(B, LD, dtype=torch.long)
    enc_mask[1, 15:] = 0
    ids = _ids(10)
    cross = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    first = dict(input_ids=ids[:, :9], attention_mask=torch.ones(B, 9, dtype=torch.long), **cross)
    then = dict(input_ids=ids[:, 9:], attention_mask=torch.ones(B, 10, dtype=torch.long), **cross)
    return transformers.BertLMHeadModel(cfg), first, then


def t5_decoder(attn_implementation):
    cfg = transformers.T5Config(d_model=64, d_kv=16, num_heads=4, num_layers=2,
                                num_decoder_layers=2, d_ff=128,
                                **dict(SEQ2SEQ, attn_implementation=attn_implementation))
    enc = dict(input_ids=_ids(), attention_mask=_right_padded())
    ids = _ids(LD)
    return (transformers.T5ForConditionalGeneration(cfg), dict(enc, decoder_input_ids=ids[:, :-1]),
            dict(enc, decoder_input_ids=ids[:, -1:]))


def _prefix_then_step(model, first, then):
    out = model(**first, use_cache=True)
    step = model(**then, past_key_values=out.past_key_values, use_cache=True)
    return out.logits, step.logits


# (transformers 4.x's T5 has no SDPA class; its BERT has one, patched separately)
@pytest.mark.parametrize("family, attn_implementation",
                         [("bert-decoder", "eager"), ("bert-decoder", "sdpa"), ("t5", "eager")])
def test_cached_decoding_equals_eager(family, attn_implementation):
    """A prefix with use_cache=True, then one token from the cache: causal self attention,
    cross attention over a padded encoder output, and both caches (the cross one reused)."""
    build = {"bert-decoder": bert_decoder, "t5": t5_decoder}[family]
    model, first, then = build(attn_implementation)
    model.eval()
    sparse = sa.enable_(copy.deepcopy(model), block_size=BLOCK)
    with torch.no_grad():
        want = _prefix_then_step(model, first, then)
        got = _prefix_then_step(sparse, first, then)
    for g, w in zip(got, want):
        assert max_rel_err(g, w) <= 1e-4


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_resized_heads_with_pruned_layouts(family):
    """After ModelSpeedup's resize (one head fewer per module, T5's shared position bias
    sliced per layer), layouts index the module's own heads: a further all-false head equals
    zeroing that head's value rows."""
    from sparsekernels.arch import find_attention
    from sparsekernels.speedup import ModelSpeedup
    from tests.speedup.families import build, head_masks, output_of

    model, dummy = build(family)
    model = ModelSpeedup(model, dummy, head_masks(model), mode="resize").speedup_model()
    names = [n for n, _ in sa.attention_modules(model)]
    blocks = {b.name: b for b in find_attention(model)}
    assert set(names) <= set(blocks)
    zeroed, layouts = copy.deepcopy(model), {}
    for name in names:
        heads = 3  # 4 - the one ModelSpeedup removed
        d = blocks[name].head_dim
        assert model.get_submodule(blocks[name].v).weight.shape[0] == heads * d
        with torch.no_grad():
            zeroed.get_submodule(blocks[name].v).weight[d:2 * d] = 0  # head 1
        keep = torch.tensor([True, False, True])
        layouts[name] = sa.head_mask_layout(keep, 32, block_size=BLOCK)
    sparse = sa.enable_(copy.deepcopy(model), layouts=layouts, block_size=BLOCK)
    with torch.no_grad():
        assert max_rel_err(output_of(sparse, dummy), output_of(zeroed, dummy)) <= 1e-4
