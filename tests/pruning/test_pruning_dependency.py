"""Dependency-aware mode: coupled channels found by tracing get consistent masks."""

import copy
import math

import pytest
import torch
from pruning_models import BUILDERS, build_gpt2, build_mlp, dummy_input

from sparsekernels.pruning import FPGMPruner, L1NormPruner, L2NormPruner
from sparsekernels.arch import layers
from sparsekernels.arch import find_attention
from sparsekernels.arch import TracingError, find_channel_groups


def _group(groups, name, kind):
    found = [g for g in groups for m in g.members if m.name == name and m.kind == kind]
    assert found, (name, kind)
    return found[0]


def test_bert_groups():
    model = BUILDERS["bert"]()
    groups = find_channel_groups(model, dummy_input("bert"))
    residual = _group(groups, "embeddings.word_embeddings", "out")
    assert residual.size == 32
    for i in range(2):
        p = f"encoder.layer.{i}."
        assert {p + "attention.self.query", p + "attention.self.key", p + "attention.self.value",
                p + "intermediate.dense"} <= residual.names("in")
        assert {p + "attention.output.dense", p + "output.dense"} <= residual.names("out")
        assert {p + "attention.output.LayerNorm", p + "output.LayerNorm"} <= residual.names("norm")
        assert _group(groups, p + "attention.self.query", "out").names() == {
            p + "attention.self.query", p + "attention.self.key"}
        assert _group(groups, p + "attention.self.value", "out").names() == {
            p + "attention.self.value", p + "attention.output.dense"}
        assert _group(groups, p + "intermediate.dense", "out").names() == {
            p + "intermediate.dense", p + "output.dense"}
    assert {"embeddings.position_embeddings", "embeddings.token_type_embeddings"} <= \
        residual.names("out")
    assert "pooler.dense" in residual.names("in")


def test_gpt2_fused_qkv_and_tied_embeddings():
    model = build_gpt2(lm=True)
    groups = find_channel_groups(model, dummy_input("gpt2"))
    residual = _group(groups, "transformer.wte", "out")
    assert "lm_head" in residual.names("in")
    assert {"transformer.ln_f", "transformer.h.1.ln_2"} <= residual.names("norm")
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= residual.names("in")
    assert _group(groups, "lm_head", "out").names() == {"lm_head", "transformer.wte"}
    v_group = _group(groups, "transformer.h.0.attn.c_proj", "in")
    (v_member,) = [m for m in v_group.members if m.name == "transformer.h.0.attn.c_attn"]
    assert v_member.index.tolist() == list(range(64, 96))
    qk = [g for g in groups if sorted(m.index[0].item() for m in g.members
                                      if m.name == "transformer.h.0.attn.c_attn") == [0, 32]]
    assert len(qk) == 1


def test_t5_encoder_decoder_share_the_residual_stream():
    groups = find_channel_groups(BUILDERS["t5"](), dummy_input("t5"))
    residual = _group(groups, "shared", "out")
    assert {"encoder.block.1.layer.1.DenseReluDense.wo", "decoder.block.0.layer.0.SelfAttention.o"
            } <= residual.names("out")
    assert "decoder.block.1.layer.1.EncDecAttention.k" in residual.names("in")
    assert "encoder.final_layer_norm" in residual.names("norm")


def test_vit_patch_embedding_and_free_parameters():
    model = BUILDERS["vit"]()
    groups = find_channel_groups(model, dummy_input("vit"))
    residual = _group(groups, "embeddings.patch_embeddings.projection", "out")
    assert {"embeddings.cls_token", "embeddings.position_embeddings"} <= residual.names("param")
    # module names differ between transformers 4.x and 5.x: find them by structure
    first_q = find_attention(model)[0].q
    ffn_in = [n for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features]
    assert first_q in residual.names("in") and set(ffn_in) <= residual.names("in")


def _pruned_channels(module, mask, member):
    c = layers.to_canonical(module, mask).movedim(member.dim, 0)
    sub = c[member.index].reshape(member.index.numel(), -1)
    return frozenset((sub.sum(1) == 0).nonzero().flatten().tolist())


READERS = (r".*(query|key|value|intermediate\.dense|c_attn|c_fc|\.q|\.k|\.v|wi|q_proj|k_proj"
           r"|v_proj|fc1|pooler\.dense|lm_head|fc2|fc3)")
CONFIGS = {
    "out": [{"op_types": ["Linear", "Conv1D", "Embedding", "Conv2d"], "sparsity": 0.5,
             "granularity": "out_channel"}],
    "in": [{"op_types": ["Linear", "Conv1D"], "sparsity": 0.5, "granularity": "in_channel"}],
    "mixed": [{"op_types": ["Linear", "Conv1D", "Embedding", "Conv2d"], "sparsity": 0.5,
               "granularity": "out_channel"},
              {"op_names_re": [READERS], "op_types": ["Linear", "Conv1D"], "sparsity": 0.5,
               "granularity": "in_channel"}],
}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5", "vit", "mlp"])
@pytest.mark.parametrize("pruner", [L1NormPruner, L2NormPruner, FPGMPruner])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_masks_agree_across_coupled_layers(kind, pruner, variant):
    model = BUILDERS[kind]() if kind != "gpt2" else build_gpt2(lm=True)
    x = dummy_input(kind)
    config = [dict(c) for c in CONFIGS[variant]]
    if kind == "mlp" and variant == "mixed":
        config[1]["op_names_re"] = ["fc2", "fc3"]
    p = pruner(model, config, mode="dependency_aware", dummy_input=x)
    targets = dict(p._targets)
    _, masks = p.compress()
    modules = dict(model.named_modules())
    checked = 0
    for group in find_channel_groups(model, x):
        pruned = set()
        for m in group.members:
            if m.kind not in ("in", "out") or m.name not in targets:
                continue
            wanted = "out_channel" if m.kind == "out" else "in_channel"
            if targets[m.name].granularity != wanted:
                continue
            pruned.add(_pruned_channels(modules[m.name], masks[m.name]["weight"], m))
        if pruned:
            checked += 1
            assert len(pruned) == 1, [m.name for m in group.members]
            assert len(next(iter(pruned))) == math.floor(0.5 * group.size + 0.5)
    assert checked >= (1 if variant == "mixed" else 2)


def test_coupled_channels_rank_the_summed_importance():
    model = build_mlp()
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 12)
    _, dep = L1NormPruner(model, [{"op_names": ["fc1"], "sparsity": 0.5,
                                   "granularity": "out_channel"},
                                  {"op_names": ["fc2"], "sparsity": 0.5,
                                   "granularity": "in_channel"}],
                          mode="dependency_aware", dummy_input=x).compress()
    rows = (dep["fc1"]["weight"].sum(1) == 0)
    cols = (dep["fc2"]["weight"].sum(0) == 0)
    assert torch.equal(rows, cols) and int(rows.sum()) == 12
    # the coupled choice ranks the sum of fc1 row and fc2 column L1 norms
    score = fresh.fc1.weight.abs().sum(1).double() + fresh.fc2.weight.abs().sum(0).double()
    assert set(rows.nonzero().flatten().tolist()) == set(
        torch.sort(score, stable=True).indices[:12].tolist())


def test_tracing_failure_names_operation_and_module():
    model = build_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TracingError, match=r"operation 'linear' in module 'fc1'"):
        L1NormPruner(model, [{"sparsity": 0.5, "granularity": "out_channel"}],
                     mode="dependency_aware", dummy_input=torch.randn(2, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _ResidualCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = torch.nn.BatchNorm2d(8)
        self.conv1 = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(6)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc((x + y).mean((2, 3)))


def test_conv_residual_batchnorm_and_pooling():
    model = _ResidualCNN()
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(model, x)
    residual = _group(groups, "stem", "out")
    assert residual.names("out") == {"stem", "conv2"}
    assert residual.names("in") == {"conv1", "fc"} and residual.names("norm") == {"bn0"}
    assert _group(groups, "conv1", "out").names() == {"conv1", "bn1", "conv2"}
    _, masks = L1NormPruner(model, [{"op_types": ["Conv2d"], "sparsity": 0.5}],
                            mode="dependency_aware", dummy_input=x).compress()
    stem_rows = masks["stem"]["weight"].flatten(1).sum(1) == 0
    assert torch.equal(stem_rows, masks["conv2"]["weight"].flatten(1).sum(1) == 0)
    assert int(stem_rows.sum()) == 4
