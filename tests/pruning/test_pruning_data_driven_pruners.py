"""Taylor, Slim and the activation pruners: criteria against float64 references."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pruning_models import (
    NormMLP, build_bert, build_mlp, classification_step, make_batches, make_torch_evaluator)

from sparsekernels.pruning import (
    ActivationAPoZRankPruner, ActivationMeanRankPruner, ConfigError, SlimPruner,
    TaylorFOWeightPruner)
from sparsekernels.arch import find_attention


def _zero_rows(mask):
    return set((mask.reshape(mask.shape[0], -1).sum(1) == 0).nonzero().flatten().tolist())


def _lowest(score, k):
    return set(torch.sort(score, stable=True).indices[:k].tolist())


def _reference_taylor(model, batches, steps, lr=0.1):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float64)
           for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for i in range(steps):
        opt.zero_grad()
        classification_step(batches[i % len(batches)], model).backward()
        for n in acc:
            w = dict(model.named_modules())[n].weight
            acc[n] += (w.detach().double() * w.grad.double()).square()
        opt.step()
    return acc


@pytest.mark.parametrize("granularity", ["out_channel", "in_channel", "fine"])
def test_taylor_follows_accumulated_w_times_g_squared(granularity):
    model = build_mlp()
    batches = make_batches(n=3, seq=5)
    reference = _reference_taylor(model, batches, steps=5)
    pruner = TaylorFOWeightPruner(model, [{"sparsity": 0.5, "granularity": granularity}],
                                  make_torch_evaluator(model, batches), training_steps=5)
    _, masks = pruner.compress()
    for name, imp in reference.items():
        m = masks[name]["weight"]
        if granularity == "out_channel":
            assert _zero_rows(m) == _lowest(imp.sum(1), math.floor(0.5 * m.shape[0] + 0.5))
        elif granularity == "in_channel":
            assert _zero_rows(m.t()) == _lowest(imp.sum(0), math.floor(0.5 * m.shape[1] + .5))
        else:
            pruned = m.flatten() == 0
            assert int(pruned.sum()) == math.floor(0.5 * m.numel() + 0.5)
            assert float(imp.flatten()[pruned].max()) <= float(imp.flatten()[~pruned].min())


def test_taylor_global_mode_needs_total_sparsity_and_ranks_globally():
    model = build_mlp()
    batches = make_batches(n=3, seq=5)
    ev = make_torch_evaluator(model, batches)
    with pytest.raises(ConfigError, match="mode 'global'.*needs 'total_sparsity'"):
        TaylorFOWeightPruner(model, [{"sparsity": 0.5}], ev, 2, mode="global")
    _, masks = TaylorFOWeightPruner(model, [{"total_sparsity": 0.5, "granularity": "fine"}], ev, 2,
                                    mode="global").compress()
    total = sum(m["weight"].numel() for m in masks.values())
    zeros = sum(int((m["weight"] == 0).sum()) for m in masks.values())
    assert zeros == math.floor(0.5 * total + 0.5)


def test_taylor_heads_on_bert_and_dependency_aware():
    model = build_bert(head=True)
    ev = _bert_evaluator(model)
    _, masks = TaylorFOWeightPruner(
        model, [{"op_names_re": [r".*attention\.(self\.(query|key|value)|output\.dense)"],
                 "sparsity": 0.5, "granularity": "head"},
                {"op_names": ["bert.encoder.layer.1.intermediate.dense",
                              "bert.encoder.layer.1.output.dense"],
                 "sparsity": 0.25, "granularity": "out_channel"}],
        ev, training_steps=2, mode="dependency_aware").compress()
    for block in find_attention(model):
        cols = masks[block.o]["weight"].reshape(32, 4, 8).sum((0, 2)) == 0
        assert int(cols.sum()) == 2
    assert len(_zero_rows(masks["bert.encoder.layer.1.intermediate.dense"]["weight"])) == 16
    assert len(_zero_rows(masks["bert.encoder.layer.1.output.dense"]["weight"])) == 8


def _reference_slim(model, batches, steps, scale, lr=0.1):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    norms = [model.ln, model.bn]
    for i in range(steps):
        opt.zero_grad()
        loss = classification_step(batches[i % len(batches)], model)
        (loss + scale * sum(n.weight.abs().sum() for n in norms)).backward()
        opt.step()
    return {"ln": model.ln.weight.detach().abs().double(),
            "bn": model.bn.weight.detach().abs().double()}


def test_slim_prunes_smallest_scaling_factors_globally():
    model = NormMLP()
    batches = make_batches(n=3)
    reference = _reference_slim(model, batches, steps=4, scale=0.01)
    pruner = SlimPruner(model, [{"op_types": ["LayerNorm", "BatchNorm1d"], "total_sparsity": 0.25}],
                        make_torch_evaluator(model, batches), training_steps=4, scale=0.01)
    _, masks = pruner.compress()
    both = torch.cat([reference["ln"], reference["bn"]])
    expected = _lowest(both, 8)
    got = {i for i, v in enumerate(torch.cat([masks["ln"]["weight"], masks["bn"]["weight"]]))
           if v == 0}
    assert got == expected
    for name in ("ln", "bn"):
        assert torch.equal(masks[name]["weight"], masks[name]["bias"])
    assert float(model.ln.bias.detach()[masks["ln"]["bias"] == 0].abs().sum()) == 0


def test_slim_penalty_shrinks_scaling_factors_and_modes():
    model = NormMLP()
    batches = make_batches(n=3)
    plain = _reference_slim(model, batches, steps=4, scale=0.0)
    heavy = _reference_slim(model, batches, steps=4, scale=1.0)
    assert float(heavy["ln"].sum()) < float(plain["ln"].sum())
    ev = make_torch_evaluator(model, batches)
    with pytest.raises(ConfigError, match="needs 'total_sparsity'"):
        SlimPruner(model, [{"op_types": ["LayerNorm"], "sparsity": 0.5}], ev, 2)
    with pytest.raises(ConfigError, match="cannot prune"):
        SlimPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5}], ev, 2, mode="normal")
    _, masks = SlimPruner(model, [{"op_types": ["LayerNorm"], "sparsity": 0.5}], ev, 2,
                          mode="normal").compress()
    assert int((masks["ln"]["weight"] == 0).sum()) == 8


def _reference_activation(model, batches, name, activation, kind):
    module = dict(model.named_modules())[name]
    outs = []
    handle = module.register_forward_hook(lambda m, a, o: outs.append(o.detach().double()))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    y = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
    y = F.gelu(y) if activation == "gelu" else F.relu(y)
    return 1 - (y <= 0).double().mean(0) if kind == "apoz" else y.mean(0)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("pruner,kind", [(ActivationAPoZRankPruner, "apoz"),
                                         (ActivationMeanRankPruner, "mean")])
def test_activation_pruners_on_batch_seq_hidden(pruner, kind, activation):
    model = build_mlp()
    batches = make_batches(n=3, seq=7)                  # [batch, seq, hidden] activations
    expected = {n: _reference_activation(model, batches, n, activation, kind)
                for n in ("fc1", "fc2")}
    ev = make_torch_evaluator(model, batches, lr=0.0)   # weights fixed: stats = forward stats
    _, masks = pruner(model, [{"op_names": ["fc1", "fc2"], "sparsity": 0.5,
                               "granularity": "out_channel"}], ev, training_steps=3,
                      activation=activation).compress()
    for name, score in expected.items():
        assert _zero_rows(masks[name]["weight"]) == _lowest(score, 12)


def test_activation_pruners_refuse_other_granularities_and_activations():
    model = build_mlp()
    ev = make_torch_evaluator(model, make_batches())
    with pytest.raises(ConfigError, match="does not support granularity 'fine'"):
        ActivationAPoZRankPruner(model, [{"sparsity": 0.5, "granularity": "fine"}], ev, 1)
    with pytest.raises(ValueError, match="activation must be one of"):
        ActivationMeanRankPruner(model, [{"sparsity": 0.5, "granularity": "out_channel"}], ev,
                                 1, activation="swish")
    with pytest.raises(ValueError, match="training_steps must be a positive int"):
        ActivationMeanRankPruner(model, [{"sparsity": 0.5, "granularity": "out_channel"}], ev, 0)


def _bert_evaluator(model):
    from pruning_models import make_training_func

    from sparsekernels.pruning import TorchEvaluator
    batches = [(torch.randint(1, 50, (4, 8)), torch.randint(0, 2, (4,))) for _ in range(2)]

    def step(batch, model):
        return F.cross_entropy(model(input_ids=batch[0]).logits, batch[1])

    return TorchEvaluator(make_training_func(batches), torch.optim.SGD(model.parameters(), lr=0.1),
                          step, dummy_input={"input_ids": batches[0][0]})


@pytest.mark.parametrize("pruner", [ActivationMeanRankPruner, ActivationAPoZRankPruner])
def test_activation_dependency_aware_on_the_bert_residual_stream(pruner):
    model = build_bert(head=True)
    writers = [f"bert.encoder.layer.{i}.{n}" for i in range(2)
               for n in ("attention.output.dense", "output.dense")]
    _, masks = pruner(model, [{"op_names": writers, "sparsity": 0.25}], _bert_evaluator(model),
                      training_steps=2, activation="gelu", mode="dependency_aware").compress()
    rows = [_zero_rows(masks[w]["weight"]) for w in writers]
    assert all(r == rows[0] for r in rows) and len(rows[0]) == 8


def test_slim_on_bert_layernorms():
    model = build_bert(head=True)
    _, masks = SlimPruner(model, [{"op_types": ["LayerNorm"], "total_sparsity": 0.5}],
                          _bert_evaluator(model), training_steps=2).compress()
    assert len(masks) == 5
    zeros = sum(int((m["weight"] == 0).sum()) for m in masks.values())
    assert zeros == 80
    for m in masks.values():
        assert torch.equal(m["weight"], m["bias"])
