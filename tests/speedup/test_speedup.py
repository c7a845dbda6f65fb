"""ModelSpeedup on every family: the sped-up model equals the masked model (fp32, max
relative error 1e-4) in resize, kernel and auto modes; parameters drop; save/load."""

import copy

import pytest
import torch
from torch import nn

from sparsekernels import SparseLinear
from sparsekernels.formats.masks import MaskError
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from tests.speedup.families import (FAMILIES, apply_masks, block_masks, build, ffn_masks,
                                    head_masks, hidden_masks, merge, output_of)

KINDS = {
    "head": lambda m, d: head_masks(m, via="all"),
    "head_value": lambda m, d: head_masks(m, via="value"),
    "head_output": lambda m, d: head_masks(m, via="output"),
    "row": lambda m, d: ffn_masks(m, d, "row"),
    "column": lambda m, d: ffn_masks(m, d, "column"),
    "hidden": lambda m, d: hidden_masks(m, d),
    "block": lambda m, d: block_masks(m, (16, 16), 0.5),
    "all": lambda m, d: merge(head_masks(m), ffn_masks(m, d, "row"), hidden_masks(m, d),
                              block_masks(m, (16, 16), 0.7)),
}
CASES = [(k, mode) for k in ("head", "head_value", "head_output", "row", "column", "hidden")
         for mode in ("resize", "auto")] + [
             ("head", "kernel"), ("head_value", "kernel"), ("head_output", "kernel"),
             ("block", "kernel"), ("block", "auto"),
                                            ("all", "resize"), ("all", "kernel"), ("all", "auto")]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def sped_up(family, kind, mode):
    model, dummy = build(family)
    masks = KINDS[kind](model, dummy)
    reference = output_of(apply_masks(copy.deepcopy(model), masks), dummy)
    speedup = ModelSpeedup(model, dummy, masks, mode=mode, block_size=(16, 16))
    return speedup.speedup_model(), dummy, reference, speedup.report


@pytest.mark.parametrize("kind, mode", CASES, ids=[f"{k}-{m}" for k, m in CASES])
@pytest.mark.parametrize("family", FAMILIES)
def test_output_equals_masked_model(family, kind, mode):
    model, dummy, reference, report = sped_up(family, kind, mode)
    with torch.no_grad():
        out = output_of(model, dummy)
    assert out.shape == reference.shape
    assert rel_err(out, reference) <= 1e-4
    if mode in ("resize", "auto") and kind != "block":
        assert report.params_after < report.params_before, str(report)
        assert report.flops_after < report.flops_before
    if kind.startswith("head"):
        assert all(len(v) == 1 for v in report.heads_removed.values())
        assert len(report.heads_removed) >= 2
        assert report.flops_after < report.flops_before
    if mode == "kernel":
        assert any(isinstance(m, SparseLinear) for m in model.modules())
        if not kind.startswith("head"):  # head rows may not fill whole 16x16 blocks
            assert report.params_after < report.params_before  # only stored blocks count
    if mode == "kernel" and kind.startswith("head"):
        layouts = [m._sparsekernels_attention.layout for m in model.modules()
                   if getattr(m, "_sparsekernels_attention", None) is not None
                   and m._sparsekernels_attention.layout is not None]
        assert layouts and all(int((~lay.flatten(1).any(1)).sum()) == 1 for lay in layouts)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model, dummy, _, _ = sped_up(family, "all", "auto")
    with torch.no_grad():
        expected = output_of(model, dummy)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), expected)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_kernel_mode_with_head_layouts_round_trip(family, tmp_path):
    model, dummy, reference, _ = sped_up(family, "all", "kernel")
    with torch.no_grad():
        expected = output_of(model, dummy)
    assert rel_err(expected, reference) <= 1e-4
    save_model(model, tmp_path / "k")
    loaded = load_model(tmp_path / "k")
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), expected)


def test_resized_save_pretrained_loads_with_sparsekernels_loader(tmp_path):
    model, dummy, _, _ = sped_up("bert", "all", "resize")
    with torch.no_grad():
        expected = output_of(model, dummy)
    model.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, dummy), expected, rtol=0, atol=0)


def test_partly_masked_heads_are_kept_and_reported():
    model, dummy = build("bert")
    block = "bert.encoder.layer.0.attention.self"
    masks = {f"{block}.query": {"weight": torch.ones(64, 64)}}
    masks[f"{block}.query"]["weight"][:16] = 0  # head 0: only its query rows
    reference = output_of(apply_masks(copy.deepcopy(model), masks), dummy)
    s = ModelSpeedup(model, dummy, masks, mode="resize")
    out = output_of(s.speedup_model(), dummy)
    assert rel_err(out, reference) <= 1e-4
    assert not s.report.heads_removed
    assert any("partly masked" in n for n in s.report.notes)


def test_all_heads_masked_keeps_one_zero_head():
    model, dummy = build("bert")
    masks = head_masks(model, per_block=4)
    reference = output_of(apply_masks(copy.deepcopy(model), masks), dummy)
    s = ModelSpeedup(model, dummy, masks, mode="resize")
    out = output_of(s.speedup_model(), dummy)
    assert rel_err(out, reference) <= 1e-4
    assert all(len(v) == 3 for v in s.report.heads_removed.values())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad, error, match", [
    ({"nope": {"weight": torch.ones(1)}}, MaskError, "no such module"),
    ({"bert.pooler.dense": {"weight": torch.ones(3, 3)}}, MaskError, "has shape"),
    ({"bert.pooler.dense": {"weight": torch.full((64, 64), 0.5)}}, MaskError, "other than 0 and 1"),
])
def test_bad_masks_refused_before_touching_the_model(bad, error, match):
    model, dummy = build("bert")
    before = _state(model)
    with pytest.raises(error, match=match):
        ModelSpeedup(model, dummy, bad).speedup_model()
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_module_named_in_error():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.weight

    model = nn.Sequential(nn.Linear(8, 8), Scale())
    with pytest.raises(MaskError, match=r"'1' \(Scale\)"):
        ModelSpeedup(model, torch.randn(2, 8), {"1": {"weight": torch.ones(8)}}).speedup_model()


def test_bad_mode_and_input():
    model, dummy = build("bert")
    with pytest.raises(ValueError, match="mode must be one of"):
        ModelSpeedup(model, dummy, {}, mode="fast")
    with pytest.raises(TypeError, match="dummy_input"):
        ModelSpeedup(model, "text", {})


@pytest.fixture
def sdpa_from(monkeypatch):
    """Set the measured key length from which SDPA beats the attention kernel (cpu, float32)."""
    from sparsekernels.ops import crossover, router

    table = crossover._table()

    def set_(keys: int):
        patched = dict(table, attention_full_layout={"cpu": {"float32": keys}})
        monkeypatch.setattr(crossover, "_table", lambda: patched)
        router.clear_cache()

    yield set_
    monkeypatch.undo()
    router.clear_cache()


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_attention_runs_the_op_where_its_kernel_wins(family, sdpa_from, tmp_path):
    """kernel / auto modes route attention with every head kept through the block-sparse op
    (no layout) when the table says its kernel outruns SDPA for short keys; not otherwise."""
    for keys, mode in ((0, "kernel"), (512, "kernel"), (512, "auto")):
        sdpa_from(keys)
        model, dummy, reference, report = sped_up(family, "row", mode)  # no head removed
        configs = [m._sparsekernels_attention for m in model.modules()
                   if getattr(m, "_sparsekernels_attention", None) is not None]
        if keys == 0:
            assert not configs
            continue
        assert configs and all(c.layout is None for c in configs), family
        assert any("block-sparse op" in n for n in report.notes)
        with torch.no_grad():
            out = output_of(model, dummy)
        assert rel_err(out, reference) <= 1e-4
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert sum(getattr(m, "_sparsekernels_attention", None) is not None
               for m in loaded.modules()) == len(configs)
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), out)
