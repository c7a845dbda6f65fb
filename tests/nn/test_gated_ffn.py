"""Gated MLPs (SwiGLU, GeGLU) as one fused block-sparse op: SparseFFN with a gate, and
fuse_ffn_ / ModelSpeedup on decoder LLMs, against float64 and the masked model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels.nn import SparseFFN, SparseLinear, fuse_ffn_, unfuse_ffn_
from sparsekernels.ops import _ext
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from sparsekernels.testing import assert_close_to_reference
from tests.speedup.families import LLM_FAMILIES, apply_masks, block_masks, build

ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def need(backend):
    if backend == "cpu" and not _ext.has_op("bsr_gated_ffn", "cpu"):
        pytest.skip("compiled CPU extension (with bsr_gated_ffn) not built (make build)")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_gated_sparse_ffn_equals_float64(backend, activation, tokens):
    need(backend)
    up, down, gate = nn.Linear(64, 192, bias=False), nn.Linear(192, 64, bias=False), \
        nn.Linear(64, 192, bias=False)
    ffn = SparseFFN.from_linears(up, down, activation, (16, 16), sparsity=0.6, backend=backend,
                                 gate=gate)
    x = torch.randn(tokens, 64)
    with torch.no_grad():
        y = ffn(x)
        g, u, d = (m.to_linear() for m in (ffn.gate, ffn.fc1, ffn.fc2))
        act = ACTS[activation]
        base = d(act(g(x)) * u(x))
        g, u, d, x64 = g.double(), u.double(), d.double(), x.double()  # in place
        ref = d(act(g(x64)) * u(x64))
    assert_close_to_reference(y, ref, base, reduction=64 + 192)


def test_gated_sparse_ffn_trains():
    ffn = SparseFFN.from_linears(nn.Linear(32, 64), nn.Linear(64, 32), "silu", (16, 16),
                                 sparsity=0.5, backend="reference", gate=nn.Linear(32, 64))
    x = torch.randn(7, 32, requires_grad=True)
    ffn(x).square().sum().backward()
    assert all(m.values.grad is not None and m.values.grad.abs().sum() > 0
               for m in (ffn.gate, ffn.fc1, ffn.fc2))
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_gate_that_does_not_match_up_is_refused():
    up, down = SparseLinear.from_linear(nn.Linear(32, 64), (16, 16), sparsity=0.5), \
        SparseLinear.from_linear(nn.Linear(64, 32), (16, 16), sparsity=0.5)
    with pytest.raises(ValueError, match="one shape"):
        SparseFFN(up, down, "silu", gate=SparseLinear.from_linear(nn.Linear(32, 32), (16, 16)))
    with pytest.raises(ValueError, match="one block size"):
        SparseFFN(up, down, "silu", gate=SparseLinear.from_linear(nn.Linear(32, 64), (32, 32)))
    with pytest.raises(TypeError, match="SparseLinear"):
        SparseFFN(up, down, "silu", gate=nn.Linear(32, 64))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral"])
def test_kernel_mode_fuses_gated_mlps_and_matches_the_masked_model(family, tmp_path):
    assert family in LLM_FAMILIES
    model, dummy = build(family)
    masks = block_masks(model, (16, 16), 0.5)
    masked = apply_masks(copy.deepcopy(model), masks)
    speedup = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16))
    speedup.speedup_model()
    assert speedup.report.fused_ffn and all("gated" in v for v in speedup.report.fused_ffn.values())
    with torch.no_grad():
        want = masked(**dummy).logits
        got = model(**dummy).logits
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
        # saved and loaded: fused again by the record, same output
        save_model(model, tmp_path / "m")
        loaded = load_model(tmp_path / "m")
        assert all(v == "already fused" for v in fuse_ffn_(loaded).values())
        assert torch.allclose(loaded(**dummy).logits, got, rtol=0, atol=1e-5)
    assert unfuse_ffn_(model) == len(speedup.report.fused_ffn)
    with torch.no_grad():
        assert ((model(**dummy).logits - want).abs().max() / want.abs().max()).item() <= 1e-4


class AddedMLP(nn.Module):
    """Has a gate, an up and a down projection but adds instead of multiplying."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(32, 64, bias=False)
        self.up_proj = nn.Linear(32, 64, bias=False)
        self.down_proj = nn.Linear(64, 32, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_a_module_whose_code_differs_is_left_as_it_is():
    from sparsekernels.arch.sites import FFNSite
    from sparsekernels.nn.sparse_ffn import _gated_plan

    model = nn.Sequential(AddedMLP())
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(model[0], name, SparseLinear.from_linear(getattr(model[0], name), (16, 16),
                                                         sparsity=0.5))
    site = FFNSite(name="0", up="0.up_proj", down="0.down_proj", units=64, gate="0.gate_proj",
                   gate_up_fused=False, act=("0", "act_fn"), activation="silu", dropout=None,
                   layer="0")
    x = torch.randn(4, 32)
    before = model(x)
    why = _gated_plan(model, site)
    assert isinstance(why, str) and "not down(act(gate(x)) * up(x))" in why
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int8_kernel_mode_fuses_gated_mlps(family, tmp_path):
    """dtype="int8": the three QuantizedSparseLinear of each gated MLP run as one
    bsr_gated_ffn_int8 call; the same numbers as the layers one by one, near the masked model,
    and fused again after a save and load."""
    if not _ext.has_op("bsr_gated_ffn_int8", "cpu"):
        pytest.skip("compiled CPU extension (with bsr_gated_ffn_int8) not built (make build)")
    from sparsekernels.nn import QuantizedSparseLinear

    model, dummy = build(family)
    masks = block_masks(model, (16, 16), 0.5)
    masked = apply_masks(copy.deepcopy(model), masks)
    speedup = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16), dtype="int8")
    speedup.speedup_model()
    fused = speedup.report.fused_ffn
    assert fused and all(v == "fused (silu, gated)" for v in fused.values()), fused
    mlp = model.get_submodule(next(iter(fused)))
    assert isinstance(mlp.__dict__["_gated_ffn"].gate, QuantizedSparseLinear)
    import sparsekernels.ops.bsr_gated_ffn_int8 as gated_op

    calls = []
    impl = gated_op._gated_ffn_int8
    with torch.no_grad():
        from unittest import mock
        with mock.patch.object(gated_op, "_gated_ffn_int8",
                               side_effect=lambda *a: calls.append(1) or impl(*a)):
            got = model(**dummy).logits
        assert len(calls) == len(fused)
        want = masked(**dummy).logits
        assert ((got - want).norm() / want.norm()).item() < 0.05
        save_model(model, tmp_path / "m")
        loaded = load_model(tmp_path / "m")
        assert all(v == "already fused" for v in fuse_ffn_(loaded).values())
        # (attention may run another implementation after a load, as in fp32 above)
        torch.testing.assert_close(loaded(**dummy).logits, got, rtol=0, atol=1e-5)
    assert unfuse_ffn_(model) == len(fused)
    with torch.no_grad():
        torch.testing.assert_close(model(**dummy).logits, got, rtol=1e-5, atol=1e-5)


def test_fusing_does_not_read_the_weights():
    """load_model replays the record before the values are loaded: the probe that checks a
    gated MLP's forward runs on random weights of its own, so garbage (NaN) weights fuse."""
    model, dummy = build("llama")
    masks = block_masks(model, (16, 16), 0.5)
    ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16),
                 fuse_ffn=False).speedup_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    report = fuse_ffn_(model)
    assert report and all(v.startswith("fused") for v in report.values()), report
