"""The model map reads every family's attention, FFNs and residual stream from structure
(and one traced forward), and says what it could not find."""

import io

import pytest
import torch
import transformers as tf

from sparsekernels.arch import StructureError, describe, find_attention, find_ffn, map_model
from tests.speedup.families import FAMILIES, build

# family -> (attention sites, cross, heads, kv heads, head dim, qkv layout, FFN sites, gated,
#            activation, tied)
EXPECTED = {
    "bert": (2, 0, 4, 4, 16, "separate", 2, False, "gelu", False),
    "roberta": (2, 0, 4, 4, 16, "separate", 2, False, "gelu", False),
    "gpt2": (2, 0, 4, 4, 16, "blocked", 2, False, "gelu_tanh", True),
    "bart": (6, 2, 4, 4, 16, "separate", 4, False, "gelu", True),
    "t5": (6, 2, 4, 4, 16, "separate", 4, True, "gelu_tanh", True),
    "vit": (2, 0, 4, 4, 16, "separate", 2, False, "gelu", False),
}


def llama():
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=96)
    return tf.LlamaForCausalLM(cfg).eval()


def phi3():
    cfg = tf.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=96,
                        pad_token_id=0)
    return tf.Phi3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_mapped(family):
    model, dummy = build(family)
    (n_att, n_cross, heads, kv, dim, layout, n_ffn, gated, act, tied) = EXPECTED[family]
    m = map_model(model, dummy)
    assert len(m.attention) == n_att
    assert sum(s.cross for s in m.attention) == n_cross
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.qkv_layout) for s in m.attention} \
        == {(heads, kv, dim, layout)}
    assert len(m.ffn) == n_ffn and all(s.gated == gated for s in m.ffn)
    assert {s.activation for s in m.ffn} == {act}
    assert bool(m.tied) == tied
    assert m.layers and all(layer.attention and layer.ffn for layer in m.layers)
    stream = m.streams[0]
    assert stream.width == 64 and stream.norms and stream.consumers
    modules = dict(model.named_modules())
    for site in m.attention:
        for name in site.projections:
            assert name in modules
    for site in m.ffn:
        assert site.units == 128 and site.up in modules and site.down in modules


def test_grouped_query_attention_and_gated_mlp():
    m = map_model(llama())
    site = m.attention[0]
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.group_size) == (8, 4, 8, 2)
    assert site.rotary_dims == 8
    # a unit of head pruning is a kv group: its K, V rows and its two query heads' Q rows
    members = dict((name, idx) for name, _, idx in site.head_members())
    assert members[site.k].shape == (4, 8) and members[site.q].shape == (4, 16)
    assert members[site.q][1].tolist() == list(range(16, 32))
    ffn = m.ffn[0]
    assert ffn.gated and ffn.activation == "silu" and ffn.first_layers == (ffn.gate, ffn.up)


def test_fused_qkv_and_gate_up_rows():
    m = map_model(phi3())
    site = m.attention[0]
    assert site.qkv_layout == "blocked" and site.q == site.k == site.v
    assert site.rows("q").shape == (8, 8) and site.rows("k")[0, 0] == 64
    assert site.rows("v")[0, 0] == 64 + 32
    ffn = m.ffn[0]
    assert ffn.gate_up_fused and ffn.units == 128
    (name, dim, idx), _ = ffn.unit_members()
    assert idx[3].tolist() == [3, 131]


def test_heads_are_read_from_widths_after_a_resize():
    from sparsekernels.speedup import ModelSpeedup
    from tests.speedup.families import head_masks

    model, dummy = build("bert")
    masks = head_masks(model, per_block=1)
    ModelSpeedup(model, dummy, masks, mode="resize").speedup_model()
    assert {s.num_heads for s in find_attention(model)} == {3}


def test_describe_says_what_was_not_found():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    out = io.StringIO()
    m = describe(model, file=out)
    assert "no ModuleList of repeated layers found" in out.getvalue()
    with pytest.raises(StructureError, match="no attention found in Sequential: looked for"):
        m.require("attention")
    with pytest.raises(StructureError, match="gate_proj"):
        m.require("ffn")


def test_describe_prints_the_map():
    out = io.StringIO()
    describe(llama(), file=out)
    text = out.getvalue()
    assert "8 heads, 4 kv heads (groups of 2) of size 8" in text
    assert "silu(mlp.gate_proj) * mlp.up_proj -> mlp.down_proj" in text
    assert "layers 0-1" in text


def test_an_ffn_no_table_names_is_found_by_tracing():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.expand = torch.nn.Linear(16, 64)
            self.shrink = torch.nn.Linear(64, 16)

        def forward(self, x):
            return x + self.shrink(torch.relu(self.expand(self.norm(x))))

    model = torch.nn.Sequential(Block(), Block())
    assert find_ffn(model) == []
    m = map_model(model, torch.randn(3, 16))
    assert sorted((s.up, s.down) for s in m.ffn) == [("0.expand", "0.shrink"),
                                                     ("1.expand", "1.shrink")]
    assert all(s.activation is None for s in m.ffn)  # fusing needs the table; pruning does not
