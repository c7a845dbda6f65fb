"""Local reconstruction in the one-shot pruners (reconstruct=): each pruned layer's kept weights
trained on the calibration batches to give the dense model's output of that layer."""

import pytest
import torch
from pruning_models import build_mlp
from test_oneshot_models import DECODER, ONE_SHOT, build_llama, copy_of, token_batches

from sparsekernels.pruning.pruners.calibration import transformer_layers

ENTRY = {"op_names_re": [DECODER], "sparsity": 0.5}


def pruned(name, model, batches, **kwargs):
    pruner = ONE_SHOT[name](model, [dict(ENTRY)], batches, **kwargs)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return pruner, masks


def logits_error(model, dense, batches):
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(model(b).logits, dense(b).logits))
                   for b in batches)


@pytest.mark.parametrize("name", list(ONE_SHOT))
def test_reconstruction_brings_each_layer_and_the_model_closer_to_the_dense_one(name):
    torch.manual_seed(0)
    dense = build_llama()
    batches = token_batches(n=4)
    plain_model, with_model = copy_of(dense, build_llama), copy_of(dense, build_llama)
    _, plain_masks = pruned(name, plain_model, batches)
    pruner, masks = pruned(name, with_model, batches, reconstruct={"epochs": 6, "lr": 1e-3})
    # the same masks (layer 0 is pruned from the same inputs; later layers see inputs the
    # reconstructed layers changed, so only the amounts must agree there)
    layer0 = [n for n in masks if ".layers.0." in n]
    assert layer0 and all(torch.equal(masks[n]["weight"], plain_masks[n]["weight"])
                          for n in layer0)
    params = dict(with_model.named_parameters())
    for n, entry in masks.items():
        w = params[n + ".weight"]
        assert torch.count_nonzero(w[entry["weight"] == 0]) == 0, n   # pruned stay zero
        assert float((entry["weight"] == 0).float().mean()) == 0.5, n
    assert [i for i, _, _ in pruner.reconstruction_log] == [0, 1, 2]
    for i, before, after in pruner.reconstruction_log:
        assert after < before, (i, before, after)
    # only the pruned modules' weights moved: norms and embeddings are the dense model's
    dense_params = dict(dense.named_parameters())
    for n, p in params.items():
        if not any(n == m + ".weight" for m in masks):
            assert torch.equal(p, dense_params[n]), n
        assert p.grad is None and p.requires_grad == dense_params[n].requires_grad
    assert logits_error(with_model, dense, batches) < logits_error(plain_model, dense, batches)


def test_the_target_is_the_dense_layer_output():
    """Layer 0's error before training is the MSE between the pruned and the dense layer 0 on
    the model's own inputs to it, computed here independently (float64)."""
    torch.manual_seed(1)
    one = lambda: build_llama(layers=1)  # noqa: E731
    dense = one()
    batches = token_batches(n=2)
    model, plain = copy_of(dense, one), copy_of(dense, one)
    pruned("wanda", plain, batches)                     # Wanda: the same masks either way
    pruner, _ = pruned("wanda", model, batches, reconstruct={"epochs": 1, "lr": 1e-4})
    errors = []
    for b in batches:
        outs = {}
        for key, m in (("dense", dense), ("plain", plain)):
            layer = transformer_layers(m)[1][0]
            h = layer.register_forward_hook(
                lambda mod, a, out, key=key: outs.__setitem__(key, out[0] if isinstance(
                    out, tuple) else out))
            with torch.no_grad():
                m(b)
            h.remove()
        errors.append(float(((outs["plain"].double() - outs["dense"].double()) ** 2).mean()))
    (i, before, _), = pruner.reconstruction_log
    assert i == 0
    assert before == pytest.approx(sum(errors) / len(errors), rel=1e-5)


def test_a_layer_made_worse_gets_its_weights_back():
    torch.manual_seed(2)
    dense = build_llama()
    batches = token_batches(n=2)
    plain, model = copy_of(dense, build_llama), copy_of(dense, build_llama)
    pruned("wanda", plain, batches)
    pruner, _ = pruned("wanda", model, batches, reconstruct={"epochs": 3, "lr": 10.0})
    assert all(after == before for _, before, after in pruner.reconstruction_log)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("value", [0, -1, 2.5, "yes", {"epochs": 0}, {"lr": 0.0},
                                   {"lr": float("nan")}, {"steps": 3}, [4]])
def test_bad_settings_are_refused_before_anything_changes(value):
    model = build_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="reconstruct"):
        ONE_SHOT["sparsegpt"](model, [dict(ENTRY)], token_batches(), reconstruct=value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_reconstruction_needs_the_sequential_flow_and_a_layer_stack():
    with pytest.raises(ValueError, match="sequential"):
        ONE_SHOT["wanda"](build_llama(), [dict(ENTRY)], token_batches(), sequential=False,
                          reconstruct=True)
    with pytest.raises(ValueError, match="no transformer layer stack"):
        ONE_SHOT["sparsegpt"](build_mlp(), [{"op_types": ["Linear"], "sparsity": 0.5}],
                              [torch.randn(4, 12)], reconstruct=True)


def test_an_encoder_with_its_attention_mask():
    from pruning_models import VOCAB, build_bert

    torch.manual_seed(3)
    model = build_bert(head=True)
    batches = [{"input_ids": torch.randint(1, VOCAB, (2, 16)),
                "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(3)]
    pruner = ONE_SHOT["wanda"](model, [{"op_names_re": [r".*encoder\.layer\.\d+\..*"
                                                         r"(query|key|value|dense)"],
                                         "sparsity": 0.5}], batches, reconstruct=True)
    _, masks = pruner.compress()
    assert len(masks) == 12 and [i for i, _, _ in pruner.reconstruction_log] == [0, 1]
    assert all(after < before for _, before, after in pruner.reconstruction_log)
