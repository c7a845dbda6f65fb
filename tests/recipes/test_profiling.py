import pytest
import torch
import transformers as tf

# before speedup: `import sparsekernels.speedup` alone hits the amc <-> speedup import cycle
import sparsekernels.pruning  # noqa: F401
from sparsekernels.nn.sparse_linear import SparseLinear
from sparsekernels.recipes.profiling import (COMPONENTS, component_of, encoder_sparsity,
                                             params_by_component, per_layer_time)
from sparsekernels.speedup import ModelSpeedup

H, HEADS, FFN, LAYERS, VOCAB = 64, 4, 128, 2, 96
HEAD_DIM = H // HEADS


def tiny_bert():
    cfg = tf.BertConfig(hidden_size=H, num_attention_heads=HEADS, intermediate_size=FFN,
                        num_hidden_layers=LAYERS, max_position_embeddings=32, vocab_size=VOCAB)
    model = tf.BertForSequenceClassification(cfg).eval()
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 12)),
              "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    return model, inputs


def expected_dense():
    layer_attn = 4 * (H * H + H) + 2 * H  # q, k, v, o + attention.output.LayerNorm
    layer_ffn = (H * FFN + FFN) + (FFN * H + H) + 2 * H  # intermediate, output + its LayerNorm
    return {"embedding": (VOCAB + 32 + 2) * H + 2 * H,
            "attention": LAYERS * layer_attn,
            "ffn": LAYERS * layer_ffn,
            "other": (H * H + H) + (H * 2 + 2)}  # pooler + classifier (2 labels)


def test_dense_bert_components_match_the_architecture():
    model, _ = tiny_bert()
    counts = params_by_component(model)
    assert counts == expected_dense()
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert encoder_sparsity(model, counts) == 0.0


def test_removing_heads_shrinks_attention_only():
    model, inputs = tiny_bert()
    dense = params_by_component(model)
    masks = {}
    for i in range(LAYERS):  # zero head 0's value rows in every layer: the head goes away
        mask = torch.ones(H, H)
        mask[:HEAD_DIM] = 0
        masks[f"bert.encoder.layer.{i}.attention.self.value"] = {"weight": mask}
    speedup = ModelSpeedup(model, inputs, masks, mode="resize")
    model = speedup.speedup_model()
    assert sum(len(v) for v in speedup.report.heads_removed.values()) == LAYERS
    after = params_by_component(model)
    # q, k, v lose HEAD_DIM output rows (weights and biases), o loses HEAD_DIM input columns
    assert dense["attention"] - after["attention"] == LAYERS * (3 * (HEAD_DIM * H + HEAD_DIM)
                                                                + H * HEAD_DIM)
    assert {k: after[k] for k in ("embedding", "ffn", "other")} == \
        {k: dense[k] for k in ("embedding", "ffn", "other")}
    expected = (dense["attention"] - after["attention"]) / (dense["attention"] + dense["ffn"])
    assert encoder_sparsity(model, dense) == pytest.approx(expected)
    times = per_layer_time(model, inputs, reps=1)  # a resized model still profiles
    assert {f"layer.{i}" for i in range(LAYERS)} <= set(times)


def test_sparse_linear_counts_stored_blocks_only():
    model, inputs = tiny_bert()
    dense = params_by_component(model)
    for i in range(LAYERS):
        layer = model.bert.encoder.layer[i]
        layer.intermediate.dense = SparseLinear.from_linear(layer.intermediate.dense,
                                                            (16, 16), sparsity=0.5)
    after = params_by_component(model)
    stored = sum(model.bert.encoder.layer[i].intermediate.dense.values.numel()
                 for i in range(LAYERS))
    assert stored == LAYERS * FFN * H // 2
    assert dense["ffn"] - after["ffn"] == LAYERS * FFN * H - stored
    assert after["attention"] == dense["attention"]
    assert encoder_sparsity(model, dense) == pytest.approx(
        stored / (dense["attention"] + dense["ffn"]))
    model(**inputs)  # still runs


def test_count_nonzero_sees_masked_weights():
    model, _ = tiny_bert()
    dense = params_by_component(model)
    nonzero = params_by_component(model, count_nonzero=True)  # BERT starts with zero biases
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[:, : FFN // 2] = 0
    assert params_by_component(model) == dense  # stored parameters unchanged
    masked = params_by_component(model, count_nonzero=True)
    assert nonzero["ffn"] - masked["ffn"] == H * FFN // 2
    assert {k: masked[k] for k in ("embedding", "attention")} == \
        {k: nonzero[k] for k in ("embedding", "attention")}
    assert encoder_sparsity(model, dense, count_nonzero=True) > 0


@pytest.mark.parametrize("path, component", [
    ("roberta.embeddings.word_embeddings.weight", "embedding"),
    ("vit.embeddings.patch_embeddings.projection.weight", "embedding"),
    ("model.encoder.embed_positions.weight", "embedding"),
    ("transformer.wte.weight", "embedding"),
    ("roberta.encoder.layer.3.attention.self.query.weight", "attention"),
    ("vit.encoder.layer.0.attention.attention.value.bias", "attention"),
    ("vit.layers.0.attention.o_proj.weight", "attention"),
    ("transformer.h.1.attn.c_attn.weight", "attention"),
    ("model.decoder.layers.0.encoder_attn.k_proj.weight", "attention"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "attention"),
    ("bert.encoder.layer.5.intermediate.dense.weight", "ffn"),
    ("bert.encoder.layer.5.output.dense.values", "ffn"),
    ("vit.layers.0.mlp.fc1.weight", "ffn"),
    ("model.encoder.layers.1.fc2.bias", "ffn"),
    ("encoder.block.0.layer.1.DenseReluDense.wi.weight", "ffn"),
    ("bert.pooler.dense.weight", "other"),
    ("classifier.out_proj.weight", "other"),  # RoBERTa's head: out_proj outside a layer
    ("classifier.weight", "other"),
    ("vit.layernorm.weight", "other"),
])
def test_component_rules(path, component):
    assert component_of(path) == component


def test_roberta_head_out_proj_is_not_attention():
    cfg = tf.RobertaConfig(hidden_size=H, num_attention_heads=HEADS, intermediate_size=FFN,
                           num_hidden_layers=1, max_position_embeddings=40, vocab_size=VOCAB)
    counts = params_by_component(tf.RobertaForSequenceClassification(cfg))
    assert counts["other"] == (H * H + H) + (H * 2 + 2)  # classifier.dense + classifier.out_proj
    assert set(counts) == set(COMPONENTS)


def test_per_layer_time_positive_for_each_layer():
    model, inputs = tiny_bert()
    model.train()
    times = per_layer_time(model, inputs, reps=2)
    assert set(times) == {"embeddings", "head"} | {f"layer.{i}" for i in range(LAYERS)}
    assert all(v > 0 for v in times.values())
    assert model.training  # mode restored
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_per_layer_time_vit_and_errors():
    cfg = tf.ViTConfig(hidden_size=H, num_attention_heads=HEADS, intermediate_size=FFN,
                       num_hidden_layers=2, image_size=32, patch_size=8, num_labels=5)
    vit = tf.ViTForImageClassification(cfg).eval()
    times = per_layer_time(vit, {"pixel_values": torch.randn(1, 3, 32, 32)}, reps=1)
    assert {"embeddings", "layer.0", "layer.1", "head"} <= set(times)
    with pytest.raises(ValueError, match="reps"):
        per_layer_time(vit, {"pixel_values": torch.randn(1, 3, 32, 32)}, reps=0)
    with pytest.raises(ValueError, match="lacks"):
        encoder_sparsity(vit, {"embedding": 1})


@pytest.mark.gpu
def test_per_layer_time_on_cuda_uses_device_time():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, inputs = tiny_bert()
    model = model.cuda()
    times = per_layer_time(model, {k: v.cuda() for k, v in inputs.items()}, reps=2)
    assert {f"layer.{i}" for i in range(LAYERS)} <= set(times)
    assert all(v > 0 for v in times.values())


def test_int8_layers_count_their_stored_weights():
    from torch import nn

    from sparsekernels import QuantizedSparseLinear, SparseLinear

    dense = nn.Linear(64, 32)
    mask = torch.ones(32, 64)
    mask[:16, :32] = 0  # one of four 16x32 blocks pruned
    sparse = nn.Sequential(SparseLinear.from_linear(dense, (16, 32), mask=mask))
    int8 = nn.Sequential(QuantizedSparseLinear.from_linear(dense, (16, 32), mask=mask))
    assert params_by_component(int8) == params_by_component(sparse)
    assert params_by_component(int8)["other"] == 3 * 16 * 32 + 32
