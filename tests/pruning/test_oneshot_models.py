"""WandaPruner and SparseGPTPruner on whole models: the layer stack, layer-by-layer calibration
(decoder LLMs with grouped-query attention, BERT encoders with a classifier), heads, OWL,
and data-parallel calibration (2 gloo processes on CPU)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pruning_models import VOCAB, build_bert, build_gpt2, build_mlp

from sparsekernels.formats.block_sparse import units_to_prune
from sparsekernels.pruning import SparseGPTPruner, WandaPruner
from sparsekernels.pruning.pruners.calibration import transformer_layers
from sparsekernels.pruning.pruners.oneshot import wanda_scores

DECODER = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
NOT_ROTARY = r"model\.layers\.\d+\.(self_attn\.(v|o)_proj|mlp\.\w+_proj)"
ONE_SHOT = {"wanda": WandaPruner, "sparsegpt": SparseGPTPruner}


def build_llama(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def token_batches(n=3, batch=2, seq=16):
    return [torch.randint(1, VOCAB, (batch, seq)) for _ in range(n)]


def copy_of(model, build):
    other = build()
    other.load_state_dict(model.state_dict())
    return other.eval()


def zeros(masks):
    return {n: e["weight"] == 0 for n, e in masks.items()}


# ----------------------------------------------------------------------------- the stack
def test_transformer_layers_found_structurally():
    assert transformer_layers(build_llama())[0] == "model.layers"
    assert transformer_layers(build_bert(head=True))[0] == "bert.encoder.layer"
    assert transformer_layers(build_gpt2(lm=True))[0] == "transformer.h"
    assert transformer_layers(build_mlp()) is None

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    class MoELayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(Expert() for _ in range(8))

    class MoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(9))
            self.layers = torch.nn.ModuleList(MoELayer() for _ in range(2))

    # the experts list is longer but lies inside a layer; bare Linears are not layers
    assert transformer_layers(MoE())[0] == "layers"


# ------------------------------------------------------------------------ decoder LLMs
@pytest.mark.parametrize("name", list(ONE_SHOT))
@pytest.mark.parametrize("granularity", ["fine", "2:4", "block", "out_channel"])
def test_decoder_llm_layer_by_layer(name, granularity):
    model = build_llama()
    # rotary Q/K rows pair up inside a head: output channels of Q and K are refused
    selection = DECODER if granularity != "out_channel" else NOT_ROTARY
    entry = {"op_names_re": [selection], "granularity": granularity}
    if granularity != "2:4":
        entry["sparsity"] = 0.5
    if granularity == "block":
        entry["block_size"] = [8, 8]
    ids = token_batches()
    use_cache = model.config.use_cache
    _, masks = ONE_SHOT[name](model, [entry], ids).compress()
    assert len(masks) == 3 * (7 if granularity != "out_channel" else 5)
    assert "lm_head" not in masks
    assert model.config.use_cache == use_cache
    for layer, mask in masks.items():
        assert float((mask["weight"] == 0).float().mean()) == 0.5, layer
    with torch.no_grad():
        assert torch.isfinite(model(ids[0]).logits).all()
        model.generate(ids[0][:1, :4], max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("name", list(ONE_SHOT))
def test_first_layer_agrees_with_all_at_once_capture(name):
    """Layer 0 sees the dense model's inputs either way, so its masks (and SparseGPT's
    updated weights) must agree; later layers see the pruned layers' outputs only when
    calibrated layer by layer."""
    model = build_llama()
    other = copy_of(model, build_llama)
    ids = token_batches()
    config = [{"op_names_re": [DECODER], "sparsity": 0.5}]
    _, seq = ONE_SHOT[name](model, config, ids).compress()
    _, flat = ONE_SHOT[name](other, config, ids, sequential=False).compress()
    first = [n for n in seq if n.startswith("model.layers.0.")]
    assert len(first) == 7
    for n in first:
        assert torch.equal(seq[n]["weight"], flat[n]["weight"]), n
        torch.testing.assert_close(model.get_submodule(n).weight, other.get_submodule(n).weight)
    later = [n for n in seq if n.startswith("model.layers.2.")]
    assert any(not torch.equal(seq[n]["weight"], flat[n]["weight"]) for n in later)


def test_wanda_calibrates_each_layer_on_the_pruned_layers_before_it():
    model = build_llama(layers=2)
    dense = copy_of(model, lambda: build_llama(layers=2))
    ids = token_batches()
    _, masks = WandaPruner(model, [{"op_names_re": [DECODER], "sparsity": 0.5}], ids).compress()
    # the inputs of layer 1's q_proj come from the pruned layer 0 only
    seen = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in ids:
            model(batch)
    hook.remove()
    x = torch.cat(seen).double()
    scores = wanda_scores(dense.model.layers[1].self_attn.q_proj, x.square().mean(0))
    expected = torch.ones_like(scores)
    expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :16], 0.0)
    assert torch.equal(masks["model.layers.1.self_attn.q_proj"]["weight"], expected.float())


def test_gpt2_conv1d_layers():
    model = build_gpt2(lm=True).eval()
    ids = token_batches()
    _, masks = SparseGPTPruner(model, [{"op_types": ["Conv1D"], "sparsity": 0.5}],
                               ids).compress()
    assert len(masks) == 2 * 4
    for layer, mask in masks.items():
        assert float((mask["weight"] == 0).float().mean()) == 0.5, layer
        assert torch.all(model.get_submodule(layer).weight[mask["weight"] == 0] == 0)


# ---------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("name", list(ONE_SHOT))
def test_bert_classifier_one_shot(name):
    model = build_bert(head=True).eval()
    batches = [{"input_ids": torch.randint(1, VOCAB, (2, 10)),
                "attention_mask": torch.ones(2, 10, dtype=torch.long)} for _ in range(3)]
    config = [{"op_types": ["Linear"], "sparsity": 0.3}]
    with torch.no_grad():
        before = model(**batches[0]).logits
    _, masks = ONE_SHOT[name](model, config, batches).compress()
    # 2 layers x 6 Linears, the pooler and the classifier (outside the stack)
    assert len(masks) == 14 and "classifier" in masks and "bert.pooler.dense" in masks
    for layer, mask in masks.items():
        w = mask["weight"]
        assert int((w == 0).sum()) == units_to_prune(w.numel(), 0.3), layer
    with torch.no_grad():
        after = model(**batches[0]).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.parametrize("name", list(ONE_SHOT))
def test_bert_heads(name):
    model = build_bert(head=True).eval()
    batches = [{"input_ids": torch.randint(1, VOCAB, (2, 10))} for _ in range(3)]
    config = [{"op_names_re": [r".*attention\.self\.(query|key|value)", r".*attention\.output\.dense"],
               "granularity": "head", "sparsity": 0.5}]
    _, masks = ONE_SHOT[name](model, config, batches).compress()
    for i in range(2):
        prefix = f"bert.encoder.layer.{i}.attention"
        q = masks[f"{prefix}.self.query"]["weight"].view(4, 8, 32)
        o = masks[f"{prefix}.output.dense"]["weight"].view(32, 4, 8)
        gone = q.sum((1, 2)) == 0
        assert int(gone.sum()) == 2
        for proj in ("key", "value"):
            assert torch.equal(masks[f"{prefix}.self.{proj}"]["weight"].view(4, 8, 32).sum((1, 2)) == 0,
                               gone)
        assert torch.equal(o.sum((0, 2)) == 0, gone)
        weight = model.get_submodule(f"{prefix}.output.dense").weight.view(32, 4, 8)
        assert torch.all(weight[:, gone] == 0)


@pytest.mark.parametrize("name", list(ONE_SHOT))
def test_llama_heads_with_grouped_query_attention(name):
    """4 query heads share 2 key/value heads: a unit is one K/V head with its query heads."""
    model = build_llama()
    config = [{"op_names_re": [r".*self_attn\.(q|k|v|o)_proj"], "granularity": "head",
               "sparsity": 0.5}]
    ids = token_batches()
    _, masks = ONE_SHOT[name](model, config, ids).compress()
    for i in range(3):
        prefix = f"model.layers.{i}.self_attn"
        kv_gone = masks[f"{prefix}.k_proj"]["weight"].view(2, 8, 32).sum((1, 2)) == 0
        assert int(kv_gone.sum()) == 1
        assert torch.equal(masks[f"{prefix}.v_proj"]["weight"].view(2, 8, 32).sum((1, 2)) == 0,
                           kv_gone)
        q_gone = masks[f"{prefix}.q_proj"]["weight"].view(2, 2, 8, 32).sum((1, 2, 3)) == 0
        o_gone = masks[f"{prefix}.o_proj"]["weight"].view(32, 2, 16).sum((0, 2)) == 0
        assert torch.equal(q_gone, kv_gone) and torch.equal(o_gone, kv_gone)
        o = model.get_submodule(f"{prefix}.o_proj").weight.view(32, 2, 16)
        assert torch.all(o[:, kv_gone] == 0)
    with torch.no_grad():
        assert torch.isfinite(model(ids[0]).logits).all()


@pytest.mark.parametrize("name", list(ONE_SHOT))
def test_llama_query_heads_within_groups(name):
    """'query_head': one of the two query heads of every key/value group; K and V stay."""
    model = build_llama()
    config = [{"op_names_re": [r".*self_attn\.(q|k|v|o)_proj"], "granularity": "query_head",
               "sparsity": 0.5}]
    ids = token_batches()
    _, masks = ONE_SHOT[name](model, config, ids).compress()
    for i in range(3):
        prefix = f"model.layers.{i}.self_attn"
        q_gone = masks[f"{prefix}.q_proj"]["weight"].view(2, 2, 8, 32).sum((2, 3)) == 0
        assert torch.equal(q_gone.sum(1), torch.ones(2, dtype=torch.long))
        o_gone = masks[f"{prefix}.o_proj"]["weight"].view(32, 2, 2, 8).sum((0, 3)) == 0
        assert torch.equal(o_gone, q_gone)
        for proj in ("k_proj", "v_proj"):
            assert f"{prefix}.{proj}" not in masks or bool(masks[f"{prefix}.{proj}"]["weight"].all())
        o = model.get_submodule(f"{prefix}.o_proj").weight.view(32, 2, 2, 8)
        assert torch.all(o[:, q_gone] == 0) and bool((o[:, ~q_gone] != 0).all())
    with torch.no_grad():
        assert torch.isfinite(model(ids[0]).logits).all()


# --------------------------------------------------------------------------------- OWL
def test_owl_amounts_follow_the_outlier_ratios_of_the_dense_model():
    model = build_llama(layers=4)
    dense = copy_of(model, lambda: build_llama(layers=4))
    ids = token_batches()
    lam, threshold = 0.1, 3.0
    config = [{"op_names_re": [DECODER], "sparsity": 0.5,
               "owl": {"lambda": lam, "threshold": threshold}}]
    _, masks = WandaPruner(model, config, ids).compress()
    # the outlier ratio of each layer, from the dense model's inputs
    inputs = {}
    hooks = [dense.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: inputs.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for n in masks]
    with torch.no_grad():
        for batch in ids:
            dense(batch)
    for h in hooks:
        h.remove()
    ratios = []
    for i in range(4):
        names = [n for n in masks if n.startswith(f"model.layers.{i}.")]
        scores = torch.cat([wanda_scores(dense.get_submodule(n),
                                         torch.cat(inputs[n]).double().square().mean(0)).flatten()
                            for n in names])
        ratios.append(float((scores > threshold * scores.mean()).double().mean()))
    D = torch.tensor(ratios, dtype=torch.float64)
    r = (D - D.min()) / (D.max() - D.min()) * 2 * lam
    amounts = 0.5 - (r - r.mean())
    assert float(amounts.max() - amounts.min()) > 0.05
    for n, mask in masks.items():
        s = float(amounts[int(n.split(".")[2])])
        assert abs(int((mask["weight"] == 0).sum()) - units_to_prune(mask["weight"].numel(), s)) <= 1, n
    total = sum(int((m["weight"] == 0).sum()) for m in masks.values())
    assert abs(total / sum(m["weight"].numel() for m in masks.values()) - 0.5) < 1e-3


# ----------------------------------------------------------------------- data parallel
def _ddp_problem():
    torch.manual_seed(4321)
    model = build_llama(layers=2)
    ids = token_batches(n=2, batch=4)
    return model, ids


def _run(model, ids, shard=None):
    if shard is not None:
        rank, world = shard
        ids = [b[rank * 2:(rank + 1) * 2] for b in ids]
    out = {}
    for name, cls in ONE_SHOT.items():
        m = copy_of(model, lambda: build_llama(layers=2))
        _, masks = cls(m, [{"op_names_re": [DECODER], "sparsity": 0.5}], ids).compress()
        out.update({f"{name}/{k}/mask": v["weight"].clone() for k, v in masks.items()})
        out.update({f"{name}/{k}/weight": m.get_submodule(k).weight.detach().clone()
                    for k in masks})
    return out


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, ids = _ddp_problem()
        torch.save(_run(model, ids, shard=(rank, world)), os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_calibration_statistics_averaged_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    model, ids = _ddp_problem()
    single = _run(model, ids)
    assert r0.keys() == r1.keys() == single.keys() and len(r0) == 2 * 2 * 14
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs across ranks"
        if k.endswith("/mask"):
            assert torch.equal(r0[k], single[k]), f"{k}: DDP and single-process masks differ"
        else:
            torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)
