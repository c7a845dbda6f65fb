"""rms_norms_: the decoder LLMs' RMS norms on sparsekernels::rms_norm in inference (Llama
style and Gemma's 1 + weight), the module's own forward in training; found by the model map,
checked on a probe; recorded by ModelSpeedup and restored on load."""

import copy

import pytest
import torch
from torch import nn

from sparsekernels.arch import find_rms_norms
from sparsekernels.nn import rms_norms_, undo_rms_norms_
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from sparsekernels.speedup.surgery import validate_structure
from tests.speedup.families import LLM_FAMILIES, block_masks, build, output_of


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_norms_on_the_op_and_unchanged(family):
    model, dummy = build(family)
    sites = find_rms_norms(model)
    assert len(sites) >= 2 * model.config.num_hidden_layers + 1  # per layer two, and the final
    assert all(s.offset == ("gemma" in family) for s in sites)
    with torch.no_grad():
        want = output_of(model, dummy)
    report = rms_norms_(model)
    assert report == {s.name: "kernel" for s in sites}
    with torch.no_grad():
        assert rel_err(output_of(model, dummy), want) <= 1e-5
    assert rms_norms_(model) == {s.name: "already on the op" for s in sites}
    assert undo_rms_norms_(model) == len(sites)
    with torch.no_grad():
        assert torch.equal(output_of(model, dummy), want)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_model(family):
    model, dummy = build(family)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        reference = output_of(copy.deepcopy(model).double(), dummy)
        plain = output_of(model, dummy)
        rms_norms_(model)
        got = output_of(model, dummy)
    assert rel_err(got, reference) <= 0.05
    assert rel_err(got, plain) <= 0.05


def test_training_runs_the_module_forward():
    model, dummy = build("llama")
    plain = copy.deepcopy(model)
    rms_norms_(model)
    for m in (model, plain):
        m.train()
    loss = output_of(model, dummy).square().mean()
    plain_loss = output_of(plain, dummy).square().mean()
    loss.backward()
    plain_loss.backward()
    assert torch.equal(loss, plain_loss)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


class NotRMS(nn.Module):
    """Named like an RMS norm, with a weight and an eps, but a LayerNorm inside."""

    def __init__(self, n=32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, None,
                                        self.variance_epsilon)


NotRMS.__name__ = "FakeRMSNorm"


def test_lookalike_left_as_is():
    model = nn.Sequential(NotRMS()).eval()
    assert [s.name for s in find_rms_norms(model)] == ["0"]
    assert rms_norms_(model)["0"].startswith("left as is")
    assert "_rms_norm" not in model[0].__dict__


def test_garbage_weights_still_pass_the_probe():
    model, _ = build("qwen2")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    assert set(rms_norms_(model).values()) == {"kernel"}


def test_speedup_records_and_reloads(tmp_path):
    model, dummy = build("llama")
    masks = block_masks(model, (16, 16), 0.5)
    ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16)).speedup_model()
    on_op = [n for n, m in model.named_modules() if "_rms_norm" in m.__dict__]
    assert len(on_op) == len(find_rms_norms(model))
    with torch.no_grad():
        expected = output_of(model, dummy)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert [n for n, m in loaded.named_modules() if "_rms_norm" in m.__dict__] == on_op
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), expected)


def test_record_on_another_module_refused():
    model, _ = build("llama")
    name = find_rms_norms(model)[0].name
    linear = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    validate_structure(model, {name: [{"op": "rms_norm"}]})
    with pytest.raises(ValueError, match="not an RMS norm"):
        validate_structure(model, {linear: [{"op": "rms_norm"}]})
