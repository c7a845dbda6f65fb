"""fuse_add_norm_: a post-norm block's residual add and LayerNorm as one op in inference; the
module's own forward in training; found by the model map and checked on a probe; recorded by
ModelSpeedup and fused again on load."""

import copy

import pytest
import torch
from torch import nn

from sparsekernels.arch import find_add_norm
from sparsekernels.nn import fuse_add_norm_, unfuse_add_norm_
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from sparsekernels.speedup.surgery import validate_structure
from tests.speedup.families import block_masks, build, output_of


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bert_blocks_fused_and_unchanged(family):
    model, dummy = build(family)
    sites = find_add_norm(model)
    n_layers = model.config.num_hidden_layers
    assert len(sites) == 2 * n_layers  # attention output and FFN output per layer
    with torch.no_grad():
        want = output_of(model, dummy)
    fused = copy.deepcopy(model)
    report = fuse_add_norm_(fused)
    assert sorted(report) == sorted(s.name for s in sites)
    assert set(report.values()) == {"fused"}
    with torch.no_grad():
        got = output_of(fused, dummy)
    assert rel_err(got, want) <= 1e-5
    assert fused.state_dict().keys() == model.state_dict().keys()
    assert fuse_add_norm_(fused) == {s.name: "already fused" for s in sites}
    assert unfuse_add_norm_(fused) == 2 * n_layers
    assert find_add_norm(fused) == sites and not any("_add_norm" in m.__dict__
                                                     for m in fused.modules())


def test_bf16_model_within_bf16_rounding():
    model, dummy = build("bert")
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        reference = output_of(copy.deepcopy(model).double(), dummy)
        fuse_add_norm_(model)
        fused = output_of(model, dummy)
    # the whole model in bf16 (max relative error over 30 draws: 0.02, as the unfused model)
    assert rel_err(fused, reference) <= 0.05


def test_training_runs_the_module_forward():
    model, dummy = build("bert")
    plain = copy.deepcopy(model)
    fuse_add_norm_(model)
    for m in (model, plain):
        m.train()
    torch.manual_seed(3)
    loss = output_of(model, dummy).square().mean()
    loss.backward()
    torch.manual_seed(3)
    plain_loss = output_of(plain, dummy).square().mean()
    plain_loss.backward()
    assert torch.equal(loss, plain_loss)  # same dropout draws, the same ops
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_grad_in_eval_takes_torch():
    model, dummy = build("bert")
    fuse_add_norm_(model)
    model.eval()
    out = output_of(model, dummy)
    assert out.requires_grad  # parameters want gradients: torch's ops, with a graph
    out.sum().backward()
    site = find_add_norm(model)[0]
    assert model.get_submodule(site.norm).weight.grad is not None


class LookAlike(nn.Module):
    """dense, dropout and LayerNorm children, but pre-norm: dense(norm(h)) + residual."""

    def __init__(self, n=32):
        super().__init__()
        self.dense = nn.Linear(n, n)
        self.dropout = nn.Dropout(0.1)
        self.LayerNorm = nn.LayerNorm(n)

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(self.LayerNorm(hidden_states))) + input_tensor


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = LookAlike()


def test_lookalike_left_as_is():
    model = Holder().eval()
    assert [s.name for s in find_add_norm(model)] == ["block"]
    report = fuse_add_norm_(model)
    assert report["block"].startswith("left as is")
    assert "_add_norm" not in model.block.__dict__


def test_speedup_records_and_reloads(tmp_path):
    model, dummy = build("bert")
    masks = block_masks(model, (16, 16), 0.5)
    reference = copy.deepcopy(model)
    ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16)).speedup_model()
    fused = [m for m in model.modules() if "_add_norm" in m.__dict__]
    assert len(fused) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        expected = output_of(model, dummy)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert len([m for m in loaded.modules() if "_add_norm" in m.__dict__]) == len(fused)
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), expected)
    # off: nothing fused
    ModelSpeedup(reference, dummy, masks, mode="kernel", block_size=(16, 16),
                 fuse_norms=False).speedup_model()
    assert not any("_add_norm" in m.__dict__ for m in reference.modules())


def test_record_on_a_module_without_layer_norm_refused():
    model, _ = build("bert")
    name = find_add_norm(model)[0].dense
    with pytest.raises(ValueError, match="holds no LayerNorm"):
        validate_structure(model, {name: [{"op": "fuse_add_norm"}]})


def test_fusing_does_not_read_the_weights():
    """A model being loaded holds no values yet when its record is replayed: the probe runs
    on random weights of its own, so garbage (here NaN) weights still fuse."""
    model, _ = build("bert")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    report = fuse_add_norm_(model)
    assert report and set(report.values()) == {"fused"}
