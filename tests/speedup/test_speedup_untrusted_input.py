"""ModelSpeedup never changes a model's output silently and refuses bad arguments before it
changes anything: channels are removed only where the weights prove what they carry, so a
degenerate dummy batch (one row, identical rows, zeros, no rows) cannot mislead it."""

import copy

import pytest
import torch
from torch import nn

from sparsekernels.arch import find_ffn
from sparsekernels.speedup import ModelSpeedup
from tests.speedup.families import FAMILIES, apply_masks, build, ffn_masks, output_of


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def degenerate(dummy: dict, how: str) -> dict:
    out = {}
    for key, t in dummy.items():
        if how == "one row":
            out[key] = t[:1]
        elif how == "identical rows":
            out[key] = t[:1, :1].expand_as(t).contiguous() if t.dim() == 2 else \
                t[:1].expand_as(t).contiguous()
        elif how == "zeros":
            out[key] = torch.zeros_like(t) if key != "attention_mask" else torch.ones_like(t)
        elif how == "no rows":
            out[key] = t[:0]
    return out


def gate_and_up_masks(model, fraction=0.3):
    """Rows of the first layers of every FFN masked: for a gated FFN, either the gate row
    only (the channel is live: act(b_gate) * up(x)) or gate and up rows together (a constant)."""
    masks = {}
    for site in find_ffn(model):
        units = torch.randperm(site.units)[: int(fraction * site.units)]
        half = len(units) // 2
        for i, name in enumerate(site.first_layers):
            rows = units if i == 0 else units[:half]  # the gate (first) gets all of them
            w = torch.ones_like(model.get_submodule(name).weight)
            w[rows] = 0
            masks[name] = {"weight": w}
    return masks


HOWS = ["one row", "identical rows", "zeros"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("family", FAMILIES)
def test_degenerate_dummy_batches_never_change_the_output(family, how):
    model, dummy = build(family)
    masks = ffn_masks(model, dummy, "row") if family != "t5" else gate_and_up_masks(model)
    masked = apply_masks(copy.deepcopy(model), masks)
    ModelSpeedup(model, degenerate(dummy, how), masks, mode="resize").speedup_model()
    with torch.no_grad():
        assert rel_err(output_of(model, dummy), output_of(masked, dummy)) <= 1e-4


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_a_batch_the_model_cannot_run_is_refused_before_any_change(family):
    model, dummy = build(family)
    masks = ffn_masks(model, dummy, "row")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(Exception, match="dummy_input"):
        ModelSpeedup(model, degenerate(dummy, "no rows"), masks, mode="resize").speedup_model()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_gate_row_alone_keeps_its_unit_and_says_so():
    model, dummy = build("t5")
    masks = gate_and_up_masks(model)
    masked = apply_masks(copy.deepcopy(model), masks)
    speedup = ModelSpeedup(model, degenerate(dummy, "identical rows"), masks, mode="resize")
    speedup.speedup_model()
    with torch.no_grad():
        assert rel_err(output_of(model, dummy), output_of(masked, dummy)) <= 1e-4
    assert any("not prove them constant" in n for n in speedup.report.notes), speedup.report
    # the units whose gate and up rows were both masked are gone
    site = find_ffn(model)[0]
    assert model.get_submodule(site.down).in_features < site.units + 1


def test_a_layer_pruned_to_nothing_keeps_one_unit():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    masked = copy.deepcopy(model)
    masks = {"0": {"weight": torch.zeros(32, 16), "bias": torch.zeros(32)}}
    x = torch.randn(5, 16)
    apply_masks(masked, masks)
    speedup = ModelSpeedup(model, x, masks, mode="resize")
    speedup.speedup_model()
    assert model[0].out_features == 1 and model[2].in_features == 1
    torch.testing.assert_close(model(x), masked(x))
    assert any("one is kept" in n for n in speedup.report.notes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="gpu"), "unknown backend 'gpu'"),
    (dict(block_size=(8, 8)), "unsupported block size"),
    (dict(block_size=(0, 0)), "unsupported block size"),
    (dict(block_size="32"), "block_size must be an int or a pair"),
    (dict(backend="cuda"), "backend='cuda' cannot run this model"),
    (dict(fuse_ffn="yes"), "fuse_ffn must be True or False"),
])
def test_bad_arguments_are_refused_before_the_model_changes(kwargs, match):
    model, dummy = build("bert")
    masks = ffn_masks(model, dummy, "row")
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    with pytest.raises((ValueError, TypeError), match=match):
        ModelSpeedup(model, dummy, masks, mode="kernel", **kwargs).speedup_model()
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_int_block_size_means_a_square_block():
    model, dummy = build("bert")
    masks = ffn_masks(model, dummy, "row")
    assert ModelSpeedup(model, dummy, masks, mode="kernel", block_size=32).block_size == (32, 32)
