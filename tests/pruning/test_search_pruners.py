"""Search pruners: SimulatedAnnealing, AutoCompress and AMC meet their totals exactly,
change the allocation, are reproducible and refuse bad arguments up front."""

import math

import pytest
import torch
from pruning_models import build_bert, build_mlp, dummy_input, make_batches, \
    make_torch_evaluator, run

from sparsekernels.pruning import ConfigError
from sparsekernels.pruning.pruners.amc import AMCPruner, layer_flops
from sparsekernels.pruning.pruners.search import (
    AutoCompressPruner, SimulatedAnnealingPruner, allocate_units)

LAYERS = ("fc1", "fc2", "fc3")
FAST_SA = {"start_temperature": 10, "stop_temperature": 2, "cool_down_rate": 0.6}


class OutputEvaluator:
    """Score: minus the squared distance of the outputs to the unpruned model's."""

    def __init__(self, model, x):
        self.model, self.x = model, x
        with torch.no_grad():
            self.reference = run(model, x).clone()

    def evaluate(self):
        with torch.no_grad():
            return -float((run(self.model, self.x) - self.reference).square().sum())


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _zeros(masks, names=LAYERS):
    return sum(int((masks[n]["weight"] == 0).sum()) for n in names)


def _numel(masks, names=LAYERS):
    return sum(masks[n]["weight"].numel() for n in names)


# ------------------------------------------------------------ allocation helper
def test_allocate_units_hits_target_within_bounds():
    units = [int(u) for u in torch.randint(5, 40, (4,))]
    sizes = [1.0] * 4
    hi = [u - 1 for u in units]
    lo = [int(torch.randint(0, u // 3, ())) for u in units]
    target = int(0.5 * sum(units))
    k = allocate_units(torch.rand(4).tolist(), units, sizes, lo, hi, target)
    assert sum(k) == target
    assert all(l <= ki <= h for l, ki, h in zip(lo, k, hi))


# ---------------------------------------------------------- simulated annealing
def test_sa_keeps_total_fixed_while_changing_allocations():
    model = build_mlp()
    x = torch.randn(4, 12)
    before = _state(model)
    s = float(torch.empty(()).uniform_(0.3, 0.7))
    ev = OutputEvaluator(model, x)
    pruner = SimulatedAnnealingPruner(model, [{"total_sparsity": s, "granularity": "fine"}],
                                      ev, **FAST_SA)
    assert _same_state(model, before)                    # nothing runs before compress
    _, masks = pruner.compress()
    target = math.floor(s * _numel(masks) + 0.5)
    assert len(pruner.history) == pruner.total_iteration == 5
    allocations = set()
    for result in pruner.history:
        assert _zeros(result.masks) == target
        allocations.add(tuple(round(result.sparsity[n], 6) for n in LAYERS))
    assert len(allocations) > 1
    best = max(pruner.history, key=lambda r: r.score)
    assert pruner.best_score == best.score
    for n in LAYERS:
        assert torch.equal(masks[n]["weight"], best.masks[n]["weight"])
        kept = masks[n]["weight"].bool()           # original weights under the best masks
        w = dict(model.named_modules())[n].weight.detach()
        assert torch.equal(w[kept], before[f"{n}.weight"][kept]) and bool((w[~kept] == 0).all())
    assert ev.evaluate() == pytest.approx(best.score)


def test_sa_is_reproducible_with_a_seed():
    model = build_mlp()
    x = torch.randn(4, 12)
    runs = []
    for _ in range(2):
        twin = build_mlp()
        twin.load_state_dict(model.state_dict())
        pruner = SimulatedAnnealingPruner(twin, [{"sparsity": 0.5, "granularity": "fine"}],
                                          OutputEvaluator(twin, x), seed=7, **FAST_SA)
        pruner.compress()
        runs.append([tuple(r.sparsity[n] for n in LAYERS) for r in pruner.history])
    assert runs[0] == runs[1]


def test_sa_channels_two_entries_and_caps():
    model = build_mlp()
    x = torch.randn(4, 12)
    config = [{"op_names": ["fc1", "fc2"], "total_sparsity": 0.5,
               "max_sparsity_per_layer": {"fc1": 0.6}},
              {"op_names": ["fc3"], "sparsity": 0.5}]
    pruner = SimulatedAnnealingPruner(model, config, OutputEvaluator(model, x),
                                      pruning_algorithm="l1", **FAST_SA)
    pruner.compress()
    for result in pruner.history:
        m = result.masks
        rows = {n: int((m[n]["weight"].sum(1) == 0).sum()) for n in LAYERS}
        assert rows["fc1"] <= math.floor(0.6 * 24)
        zeros = rows["fc1"] * 12 + rows["fc2"] * 24
        assert abs(zeros - math.floor(0.5 * (24 * 12 + 24 * 24) + 0.5)) <= 12
        assert rows["fc3"] == 3


@pytest.mark.parametrize("kwargs,config,error,match", [
    ({"start_temperature": 10, "stop_temperature": 20}, None, ValueError,
     "stop_temperature .* must be below start_temperature"),
    ({"cool_down_rate": 1.5}, None, ValueError, r"cool_down_rate must be a number in \(0"),
    ({"perturbation_magnitude": 0}, None, ValueError, "perturbation_magnitude must be"),
    ({"pruning_algorithm": "random"}, None, ValueError, "pruning_algorithm must be one of"),
    ({}, [{"total_sparsity": 0.9, "max_sparsity_per_layer": 0.5}], ConfigError,
     "caps allow at most"),
])
def test_sa_bad_arguments_leave_model_unchanged(kwargs, config, error, match):
    model = build_mlp()
    before = _state(model)
    with pytest.raises(error, match=match):
        SimulatedAnnealingPruner(model, config or [{"sparsity": 0.5}],
                                 OutputEvaluator(model, torch.randn(2, 12)), **kwargs)
    with pytest.raises(TypeError, match="evaluator must have an evaluate"):
        SimulatedAnnealingPruner(model, [{"sparsity": 0.5}], None)
    assert _same_state(model, before)


def test_sa_refuses_head_granularity_on_bert():
    model = build_bert()
    before = _state(model)
    config = [{"op_names_re": [r".*attention\.(self\.(query|key|value)|output\.dense)"],
               "sparsity": 0.5, "granularity": "head"}]
    with pytest.raises(ConfigError, match="span several modules"):
        SimulatedAnnealingPruner(model, config, OutputEvaluator(model, dummy_input("bert")),
                                 pruning_algorithm="l1")
    assert _same_state(model, before)


# ------------------------------------------------------------------ AutoCompress
def test_autocompress_schedule_monotone_and_exact():
    model = build_mlp()
    x = torch.randn(4, 12)
    ev = make_torch_evaluator(model, make_batches(n=2, seq=3))
    s, total = 0.6, 2
    pruner = AutoCompressPruner(
        model, [{"total_sparsity": s, "granularity": "fine"}], total,
        admm_params={"evaluator": ev, "iterations": 2, "training_steps": 2, "rho": 1e-3},
        sa_params={"evaluator": OutputEvaluator(model, x), "start_temperature": 10,
                   "stop_temperature": 5, "cool_down_rate": 0.5})
    _, masks = pruner.compress()
    previous = None
    for t, result in enumerate(pruner.history, start=1):
        n = _numel(result.masks)
        assert _zeros(result.masks) == math.floor((1 - (1 - s) ** (t / total)) * n + 0.5)
        if previous is not None:
            assert all(bool((result.masks[k]["weight"] <= previous[k]["weight"]).all())
                       for k in LAYERS)
        previous = result.masks
    assert _zeros(masks) == math.floor(s * _numel(masks) + 0.5)
    assert all(bool((dict(model.named_modules())[k].weight[masks[k]["weight"] == 0] == 0).all())
               for k in LAYERS)


def test_autocompress_bad_params_leave_model_unchanged():
    model = build_mlp()
    before = _state(model)
    ev = make_torch_evaluator(model, make_batches(n=1))
    with pytest.raises(TypeError, match="sa_params must be a dict"):
        AutoCompressPruner(model, [{"sparsity": 0.5}], 2, {"evaluator": ev}, None)
    with pytest.raises(TypeError, match="pruning_params .* do not fit ADMMPruner"):
        AutoCompressPruner(model, [{"sparsity": 0.5}], 2, {"evaluator": ev},
                           {"evaluator": OutputEvaluator(model, torch.randn(2, 12))})
    assert _same_state(model, before)


# -------------------------------------------------------------------------- AMC
FAST_DDPG = {"warmup": 2, "hidden1": 16, "hidden2": 16, "bsize": 8, "rmsize": 10}


@pytest.mark.parametrize("target", ["flops", "params"])
def test_amc_meets_budget_within_one_unit(target):
    model = build_mlp()
    x = torch.randn(3, 5, 12)
    s = float(torch.empty(()).uniform_(0.3, 0.6))
    pruner = AMCPruner(4, x, model, [{"total_sparsity": s, "max_sparsity_per_layer": 0.8}],
                       OutputEvaluator(model, x), ddpg_params=FAST_DDPG, target=target)
    _, masks = pruner.compress()
    tokens = 15
    expected_cost = {n: (2 * tokens if target == "flops" else 1)
                     * masks[n]["weight"].numel() for n in LAYERS}
    assert pruner.cost == pytest.approx(expected_cost)
    assert len(pruner.history) == 4
    for result in pruner.history:
        kept = 0.0
        for n in LAYERS:
            rows = result.masks[n]["weight"]
            pruned_rows = int((rows.sum(1) == 0).sum())
            assert pruned_rows <= math.floor(0.8 * rows.shape[0])
            kept += expected_cost[n] * (1 - pruned_rows / rows.shape[0])
        widest = max(expected_cost[n] / masks[n]["weight"].shape[0] for n in LAYERS)
        assert abs(kept - (1 - s) * sum(expected_cost.values())) <= widest
    assert sum(pruner.cost_kept.values()) == pytest.approx(
        max(kept_cost(r, expected_cost) for r in pruner.history
            if r.score == pruner.best_score))


def kept_cost(result, cost):
    return sum(cost[n] * (1 - int((result.masks[n]["weight"].sum(1) == 0).sum())
                          / result.masks[n]["weight"].shape[0]) for n in cost)


def test_amc_flops_on_tiny_bert_and_learning_updates_the_actor():
    model = build_bert()
    x = dummy_input("bert")
    config = [{"op_names_re": [r".*intermediate\.dense", r".*output\.dense"],
               "total_sparsity": 0.5, "granularity": "fine"}]
    pruner = AMCPruner(3, x, model, config, OutputEvaluator(model, x), pruning_algorithm="level",
                       ddpg_params=FAST_DDPG)
    _, masks = pruner.compress()
    flops = layer_flops(model, list(masks), x)
    kept = sum(flops[n] * float(masks[n]["weight"].mean()) for n in masks)
    assert abs(kept - 0.5 * sum(flops.values())) <= max(flops[n] / masks[n]["weight"].numel()
                                                        for n in masks)
    target = pruner.agent.actor_target
    fresh = type(pruner.agent)(pruner.ddpg_params, 4).actor_target
    assert any(not torch.equal(a, b) for a, b in zip(target.parameters(), fresh.parameters()))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"target": "latency"}, ValueError, "target must be 'flops' or 'params'"),
    ({"ddpg_params": {"lr": 1.0}}, ValueError, "unknown ddpg_params key 'lr'"),
    ({"ddpg_params": {"warmup": -1}}, ValueError, r"ddpg_params\['warmup'\] must be"),
    ({"pruning_algorithm": "slim"}, ValueError, "pruning_algorithm must be one of"),
    ({"total_episode": 0}, ValueError, "total_episode must be a positive int"),
    ({"dummy_input": None}, ValueError, "dummy_input is needed"),
])
def test_amc_bad_arguments_leave_model_unchanged(kwargs, error, match):
    model = build_mlp()
    before = _state(model)
    x = torch.randn(2, 12)
    args = {"total_episode": 2, "dummy_input": x, "model": model,
            "config_list": [{"total_sparsity": 0.5}], "evaluator": OutputEvaluator(model, x)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        AMCPruner(**args)
    assert _same_state(model, before)
