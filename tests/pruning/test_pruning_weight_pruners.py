"""Level / L1 / L2 / FPGM on tiny BERT, GPT-2, T5, ViT and an MLP."""

import copy
import math

import pytest
import torch
from pruning_models import BUILDERS, build_gpt2, build_mlp, dummy_input, run
from safetensors.torch import load_model

from sparsekernels.pruning import (
    FPGMPruner, L1NormPruner, L2NormPruner, LevelPruner,
    load_masks_file, total_sparsity)
from sparsekernels.arch import find_attention, layers

MODELS = list(BUILDERS)
ATTENTION_RE = (r".*(attention\.self\.(query|key|value)|attention\.output\.dense|attn\.c_attn"
                r"|attn\.c_proj|Attention\.[qkvo]|attention\.[qkvo]_proj)")


def canonical_mask(module, mask):
    return layers.to_canonical(module, mask)


def _zero_units(module, mask, granularity):
    c = canonical_mask(module, mask)
    flat = c.reshape(c.shape[0], -1) if c.dim() > 2 else c
    if granularity == "out_channel":
        return int((flat.sum(1) == 0).sum()), flat.shape[0]
    if granularity == "in_channel":
        cols = c.movedim(1, 0).reshape(c.shape[1], -1)
        return int((cols.sum(1) == 0).sum()), c.shape[1]
    return int((mask == 0).sum()), mask.numel()


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("granularity", ["fine", "out_channel", "in_channel"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_l1_reaches_sparsity_exactly_per_layer(kind, granularity, sparsity):
    model = BUILDERS[kind]()
    _, masks = L1NormPruner(model, [{"op_types": ["default"], "sparsity": sparsity,
                                     "granularity": granularity}]).compress()
    modules = dict(model.named_modules())
    assert masks
    for name, entry in masks.items():
        zeros, units = _zero_units(modules[name], entry["weight"], granularity)
        assert zeros == math.floor(sparsity * units + 0.5), name
        assert entry["weight"].shape == modules[name].weight.shape
        assert entry["weight"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["bert", "vit", "mlp"])
def test_block_granularity_exact(kind):
    model = BUILDERS[kind]()
    _, masks = L2NormPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5,
                                     "granularity": "block", "block_size": [2, 4]}]).compress()
    for entry in masks.values():
        w = entry["weight"]
        blocks = w.reshape(w.shape[0] // 2, 2, w.shape[1] // 4, 4).sum((1, 3))
        assert set(blocks.unique().tolist()) <= {0.0, 8.0}
        assert int((blocks == 0).sum()) == math.floor(0.5 * blocks.numel() + 0.5)


def _reference_pruned_rows(weight, criterion, k):
    w = weight.double()
    if criterion == "l1":
        score = w.abs().sum(1)
    elif criterion == "l2":
        score = w.square().sum(1).sqrt()
    else:
        score = torch.stack([(w - w[i]).norm(dim=1).sum() for i in range(w.shape[0])])
    return set(torch.sort(score, stable=True).indices[:k].tolist())


@pytest.mark.parametrize("pruner,criterion", [(L1NormPruner, "l1"), (L2NormPruner, "l2"),
                                              (FPGMPruner, "fpgm")])
@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_norm_criteria_choose_the_reference_rows(pruner, criterion, kind):
    model = BUILDERS[kind]()
    fmods = dict(copy.deepcopy(model).named_modules())      # the weights before pruning
    _, masks = pruner(model, [{"op_types": ["default"], "sparsity": 0.4,
                               "granularity": "out_channel"}]).compress()
    modules = dict(model.named_modules())
    for name, entry in masks.items():
        w = layers.to_canonical(fmods[name], fmods[name].weight.detach())
        k = math.floor(0.4 * w.shape[0] + 0.5)
        pruned = set((layers.to_canonical(modules[name], entry["weight"]).sum(1) == 0)
                     .nonzero().flatten().tolist())
        assert pruned == _reference_pruned_rows(w, criterion, k), name
        assert (entry["bias"] == 0).nonzero().flatten().tolist() == sorted(pruned)


def test_level_prunes_smallest_magnitudes():
    model = build_mlp()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, masks = LevelPruner(model, [{"sparsity": 0.6}]).compress()
    for name, entry in masks.items():
        w = original[f"{name}.weight"].abs()
        m = entry["weight"].bool()
        assert float(w[~m].max()) <= float(w[m].min())
        assert bool((entry["bias"] == 1).all())


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5", "vit"])
@pytest.mark.parametrize("pruner", [L1NormPruner, FPGMPruner])
def test_head_granularity_prunes_whole_heads(kind, pruner):
    model = BUILDERS[kind]()
    _, masks = pruner(model, [{"op_names_re": [ATTENTION_RE], "sparsity": 0.5,
                               "granularity": "head"}]).compress()
    modules = dict(model.named_modules())
    for block in find_attention(model):
        h, d = block.num_heads, block.head_dim
        o = layers.to_canonical(modules[block.o], masks[block.o]["weight"])
        o_heads = o.reshape(o.shape[0], h, d).sum((0, 2)) != 0
        assert int((~o_heads).sum()) == math.floor(0.5 * h + 0.5)
        qkv = [block.q] if block.fused else [block.q, block.k, block.v]
        for name in qkv:
            rows = layers.to_canonical(modules[name], masks[name]["weight"]).sum(1) != 0
            per_head = rows.reshape(-1, h, d)          # [1 or 3, heads, head_dim]
            assert torch.equal(per_head.any(-1), o_heads.expand(per_head.shape[0], h))
            assert torch.equal(per_head.all(-1), per_head.any(-1))


@pytest.mark.parametrize("granularity", ["fine", "out_channel", "in_channel"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "mlp"])
def test_global_total_sparsity_within_one_unit(kind, granularity):
    model = BUILDERS[kind]()
    _, masks = L1NormPruner(model, [{"op_types": ["default"], "total_sparsity": 0.5,
                                     "granularity": granularity,
                                     "max_sparsity_per_layer": 0.8}]).compress()
    modules = dict(model.named_modules())
    total = sum(e["weight"].numel() for e in masks.values())
    zeros = sum(int((e["weight"] == 0).sum()) for e in masks.values())
    biggest_unit = max(max(layers.canonical_shape(modules[n])) for n in masks)
    assert abs(zeros - math.floor(0.5 * total + 0.5)) <= biggest_unit
    assert abs(total_sparsity(masks) - 0.5) < 0.05
    for name, entry in masks.items():
        zeros_l, units = _zero_units(modules[name], entry["weight"], granularity)
        assert zeros_l <= math.floor(0.8 * units), name


def _manual(model, masks):
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, entry in masks.items():
            for pname, mask in entry.items():
                getattr(modules[name], pname).mul_(mask.to(torch.float64))


WRAP_CASES = [(k, "out_channel") for k in MODELS] + [
    ("bert", "head"), ("gpt2", "head"), ("bert", "dependency"), ("gpt2", "dependency"),
    ("vit", "block")]


@pytest.mark.parametrize("kind,case", WRAP_CASES)
def test_wrapped_output_equals_manual_masking(kind, case):
    model = BUILDERS[kind]().double().eval()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    config = {"op_types": ["default"], "sparsity": 0.5, "granularity": case}
    kwargs = {}
    if case == "head":
        config["op_names_re"] = [ATTENTION_RE]
    elif case == "block":
        config["block_size"] = [8, 16]
    elif case == "dependency":
        config["granularity"] = "out_channel"
        kwargs = {"mode": "dependency_aware", "dummy_input": dummy_input(kind)}
    pruner = L1NormPruner(model, [config], **kwargs)
    wrapped, masks = pruner.compress()
    assert wrapped is model and list(model.state_dict()) == keys
    _manual(reference, masks)
    x = dummy_input(kind)
    if isinstance(x, dict) and "pixel_values" in x:
        x = {"pixel_values": x["pixel_values"].double()}
    elif not isinstance(x, dict):
        x = x.double()
    out, ref = run(model, x), run(reference, x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    full = run(copy.deepcopy(reference), x)
    assert torch.equal(out, full)


def test_masks_survive_optimizer_steps_and_unwrap():
    model = build_mlp()
    pruner = L1NormPruner(model, [{"sparsity": 0.5, "granularity": "in_channel"}])
    _, masks = pruner.compress()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 12)).square().mean().backward()
        assert bool((model.fc1.weight.grad[masks["fc1"]["weight"] == 0] == 0).all())
        opt.step()
        model(torch.randn(1, 12))
    for name, entry in masks.items():
        w = getattr(model, name).weight
        assert bool((w[entry["weight"] == 0] == 0).all())
    pruner.unwrap_model()
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="no masks yet"):
        L1NormPruner(build_mlp(), [{"sparsity": 0.5}]).get_masks()


@pytest.mark.parametrize("kind", ["gpt2_lm", "bert"])
def test_export_then_load_round_trips_exactly(kind, tmp_path):
    build = (lambda: build_gpt2(lm=True)) if kind == "gpt2_lm" else BUILDERS[kind]
    model = build()
    pruner = L1NormPruner(model, [{"op_types": ["default"], "sparsity": 0.5,
                                   "granularity": "out_channel"}])
    _, masks = pruner.compress()
    pruner.export_model(tmp_path / "model.safetensors", tmp_path / "masks.safetensors")
    loaded = load_masks_file(tmp_path / "masks.safetensors")
    assert loaded.keys() == masks.keys()
    for name in masks:
        for pname in masks[name]:
            assert torch.equal(loaded[name][pname], masks[name][pname])
    other = build()
    load_model(other, str(tmp_path / "model.safetensors"))
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    second = L1NormPruner(other, [{"op_types": ["default"], "sparsity": 0.1}])
    second.load_masks(tmp_path / "masks.safetensors")
    assert all(torch.equal(second.get_masks()[n]["weight"], masks[n]["weight"]) for n in masks)
    assert "sparsity" in pruner.show_pruned_weights()


def test_tied_embedding_gets_one_mask():
    model = build_gpt2(lm=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    _, masks = LevelPruner(model, [{"op_names": ["transformer.wte", "lm_head"],
                                    "sparsity": 0.5}]).compress()
    assert torch.equal(masks["transformer.wte"]["weight"], masks["lm_head"]["weight"])
    assert bool((model.lm_head.weight[masks["lm_head"]["weight"] == 0] == 0).all())
    assert 0.5 <= 1 - float(masks["lm_head"]["weight"].mean()) <= 0.75


def test_load_masks_refuses_mismatched_masks():
    from sparsekernels.pruning import MaskError
    pruner = LevelPruner(build_mlp(), [{"sparsity": 0.5}])
    with pytest.raises(MaskError, match="no such module"):
        pruner.load_masks({"fc9": {"weight": torch.ones(1)}})
    with pytest.raises(MaskError, match="has shape"):
        pruner.load_masks({"fc1": {"weight": torch.ones(3, 3)}})
    with pytest.raises(MaskError, match="other than 0 and 1"):
        pruner.load_masks({"fc1": {"weight": torch.full((24, 12), 0.5)}})
