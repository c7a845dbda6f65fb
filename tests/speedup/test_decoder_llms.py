"""Decoder LLMs (Llama, Mistral, Qwen2, Gemma2, Phi-3: grouped-query attention, gated MLPs,
fused projections, RMSNorm, rotary embeddings) pruned and sped up in every mode: the output
and the greedy tokens equal the masked model's, and the result saves and reloads."""

import copy

import pytest
import torch

from sparsekernels.arch import find_attention, find_ffn
from sparsekernels.pruning import ConfigError, L1NormPruner
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from tests.speedup.families import (LLM_FAMILIES, apply_masks, block_masks, build, ffn_masks,
                                    head_masks, hidden_masks, merge, output_of)

KINDS = {
    "head": lambda m, d: head_masks(m, via="all"),
    "head_value": lambda m, d: head_masks(m, via="value"),
    "head_output": lambda m, d: head_masks(m, via="output"),
    "row": lambda m, d: ffn_masks(m, d, "row"),
    "column": lambda m, d: ffn_masks(m, d, "column"),
    "hidden": lambda m, d: hidden_masks(m, d),
    "block": lambda m, d: block_masks(m, (16, 16), 0.5),
    "structured": lambda m, d: merge(head_masks(m), ffn_masks(m, d, "row"), hidden_masks(m, d)),
    "all": lambda m, d: merge(head_masks(m), ffn_masks(m, d, "row"), hidden_masks(m, d),
                              block_masks(m, (16, 16), 0.7)),
}
# random blocks may zero part of a rotary head's rows, which resize refuses: resize gets
# the structured masks only
CASES = ([(k, "resize") for k in ("head", "head_value", "head_output", "row", "column",
                                   "hidden", "structured")]
         + [(k, "auto") for k in ("head", "row", "hidden", "block", "all")]
         + [(k, "kernel") for k in ("head", "block", "all")])


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def sped_up(family, kind, mode):
    model, dummy = build(family)
    masks = KINDS[kind](model, dummy)
    masked = apply_masks(copy.deepcopy(model), masks)
    speedup = ModelSpeedup(model, dummy, masks, mode=mode, block_size=(16, 16))
    return speedup.speedup_model(), masked, dummy, speedup.report


@pytest.mark.parametrize("kind, mode", CASES, ids=[f"{k}-{m}" for k, m in CASES])
@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_output_equals_masked_model(family, kind, mode):
    model, masked, dummy, report = sped_up(family, kind, mode)
    with torch.no_grad():
        assert rel_err(output_of(model, dummy), output_of(masked, dummy)) <= 1e-4
    if mode in ("resize", "auto") and kind not in ("block",):
        assert report.params_after < report.params_before, str(report)
    if kind.startswith("head") and mode == "resize":
        sites = find_attention(masked)
        # one key/value group per layer went, with its query heads
        assert [len(v) for v in report.heads_removed.values()] == \
            [s.group_size for s in sites], str(report)


@pytest.mark.parametrize("mode", ["resize", "auto", "kernel"])
@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_generate_gives_the_masked_models_tokens(family, mode):
    kind = {"resize": "structured", "auto": "all", "kernel": "all"}[mode]
    model, masked, dummy, _ = sped_up(family, kind, mode)
    ids = dummy["input_ids"][:1, :6]
    with torch.no_grad():
        want = masked.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["resize", "auto", "kernel"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma2"])
def test_layers_of_different_widths_save_and_reload(family, mode, tmp_path):
    model, dummy = build(family)
    masks = merge(head_masks(model), ffn_masks(model, dummy, "row"))
    site = find_attention(model)[1]  # the second layer loses one more group of heads
    k_rows_masked = (masks[site.k]["weight"] == 0).all(dim=1)[site.rows("k")].all(dim=1)
    unit = int((~k_rows_masked).nonzero()[0])
    more = {}
    for name, dim, index in site.head_members():
        w = torch.ones_like(model.get_submodule(name).weight)
        more[name] = {"weight": w.index_fill_(dim, index[unit], 0)}
    # random blocks stay out of attention: they could empty a group (of either layer)
    attention = {name for s in find_attention(model) for name, _, _ in s.head_members()}
    blocks = {n: m for n, m in block_masks(model, (16, 16), 0.6).items() if n not in attention}
    masks = merge(masks, more, blocks if mode != "resize" else {})
    masked = apply_masks(copy.deepcopy(model), masks)
    ModelSpeedup(model, dummy, masks, mode=mode, block_size=(16, 16)).speedup_model()
    if mode != "kernel":
        heads = [s.num_heads for s in find_attention(model)]
        assert heads[0] != heads[1], heads
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        want = output_of(masked, dummy)
        assert rel_err(output_of(model, dummy), want) <= 1e-4
        assert rel_err(output_of(loaded, dummy), want) <= 1e-4


def test_part_of_a_rotary_head_is_refused():
    model, dummy = build("llama")
    site = find_attention(model)[0]
    w = torch.ones_like(model.get_submodule(site.q).weight)
    w[site.rows("q")[0, :4]] = 0  # half of head 0's dimensions
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="rotary position embeddings rotate"):
        ModelSpeedup(model, dummy, {site.q: {"weight": w}}, mode="resize").speedup_model()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def attention_names(model):
    return [n for s in find_attention(model) for n in s.projections]


def test_head_granularity_prunes_whole_key_value_groups():
    model, dummy = build("llama")
    config = [{"op_names": attention_names(model), "sparsity": 0.5, "granularity": "head"}]
    _, masks = L1NormPruner(model, config).compress()
    for site in find_attention(model):
        k_rows = (masks[site.k]["weight"] == 0).all(dim=1)[site.rows("k")].all(dim=1)
        q_heads = (masks[site.q]["weight"] == 0).all(dim=1)[site.rows("q")].all(dim=1)
        assert int(k_rows.sum()) == site.num_kv_heads // 2
        assert torch.equal(q_heads, k_rows.repeat_interleave(site.group_size))


def test_query_head_granularity_prunes_as_many_in_every_group():
    model, dummy = build("llama")
    config = [{"op_names": attention_names(model), "sparsity": 0.5, "granularity": "query_head"}]
    _, masks = L1NormPruner(model, config).compress()
    for site in find_attention(model):
        q_heads = (masks[site.q]["weight"] == 0).all(dim=1)[site.rows("q")].all(dim=1)
        per_group = q_heads.view(site.num_kv_heads, site.group_size).sum(dim=1)
        assert per_group.tolist() == [site.group_size // 2] * site.num_kv_heads
        assert site.k not in masks or bool((masks[site.k]["weight"] != 0).all())
    masked = apply_masks(copy.deepcopy(model), masks)
    ModelSpeedup(model, dummy, masks, mode="resize").speedup_model()
    assert {s.group_size for s in find_attention(model)} == {1}
    with torch.no_grad():
        assert rel_err(output_of(model, dummy), output_of(masked, dummy)) <= 1e-4


def test_out_channel_pruning_of_rotary_queries_is_refused():
    model, _ = build("llama")
    site = find_attention(model)[0]
    with pytest.raises(ConfigError, match="rotary position embeddings rotate"):
        L1NormPruner(model, [{"op_names": [site.q], "sparsity": 0.5,
                              "granularity": "out_channel"}])


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_dependency_aware_ffn_units_span_gate_up_and_down(family):
    model, dummy = build(family)
    site = find_ffn(model)[0]
    firsts = list(dict.fromkeys([site.gate or site.up, site.up]))
    config = [{"op_names": firsts, "sparsity": 0.5, "granularity": "out_channel"}]
    _, masks = L1NormPruner(model, config, mode="dependency_aware",
                            dummy_input=dummy).compress()
    rows = [(masks[n]["weight"] == 0).all(dim=1) for n in firsts]
    if site.gate_up_fused:
        rows = list(rows[0].view(2, site.units))
    assert all(torch.equal(r, rows[0]) for r in rows) and int(rows[0].sum()) == site.units // 2
    masked = apply_masks(copy.deepcopy(model), masks)
    ModelSpeedup(model, dummy, masks, mode="resize").speedup_model()
    assert find_ffn(model)[0].units == site.units // 2
    with torch.no_grad():
        assert rel_err(output_of(model, dummy), output_of(masked, dummy)) <= 1e-4


@pytest.mark.parametrize("family", [f for f in LLM_FAMILIES if f != "gemma2"])
def test_generate_through_enable_gives_the_eager_tokens(family):
    """Attention through the block-sparse op (all-true layouts) under generate() with
    transformers' KV cache: grouped k/v heads, queries at the end of the cache, Mistral's
    sliding window; greedy tokens equal the eager model's. (Gemma2's soft-capped scores
    are refused by enable_.)"""
    from sparsekernels import attention

    model, dummy = build(family)
    sparse = attention.enable_(copy.deepcopy(model), block_size=(16, 16))
    ids = dummy["input_ids"][:1, :9]
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        got = sparse.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_hidden_size_pruned_by_a_pruner_resizes(family):
    """Dependency-aware out_channel pruning of the stream's producers (embedding, o_proj,
    down_proj) zeroes hidden channels everywhere they are written; the RMS norms leave a zero
    channel zero, so resize removes it (the norms keep normalising over the old width)."""
    from sparsekernels.arch import map_model

    model, dummy = build(family)
    stream = map_model(model, dummy).streams[0]
    config = [{"op_names": list(stream.producers), "op_types": ["Linear", "Embedding"],
               "sparsity": 0.25, "granularity": "out_channel"}]
    pruner = L1NormPruner(model, config, mode="dependency_aware", dummy_input=dummy)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    masked = copy.deepcopy(model)
    ModelSpeedup(model, dummy, masks, mode="resize").speedup_model()
    assert model.get_input_embeddings().weight.shape[1] == stream.width - stream.width // 4
    with torch.no_grad():
        assert rel_err(output_of(model, dummy), output_of(masked, dummy)) <= 1e-4
