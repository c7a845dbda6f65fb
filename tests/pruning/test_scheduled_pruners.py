"""ADMM and the scheduled pruners (AGP, Linear, LotteryTicket): targets, schedules,
monotone masks, weight rewinding, intermediate files and argument errors."""

import math

import pytest
import torch
from pruning_models import NormMLP, build_bert, build_mlp, dummy_input, make_batches, \
    make_torch_evaluator, run

from sparsekernels.pruning import ConfigError, TorchEvaluator, load_masks_file
from sparsekernels.pruning.pruners.admm import ADMMPruner
from sparsekernels.pruning.pruners.scheduled import (
    AGPPruner, LinearPruner, LotteryTicketPruner)

LAYERS = ("fc1", "fc2", "fc3")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _rows_pruned(mask):
    return int((mask.reshape(mask.shape[0], -1).sum(1) == 0).sum())


class ScoreEvaluator:
    """evaluate() returns fresh random scores; records how often it ran."""

    def __init__(self):
        self.scores = []

    def evaluate(self):
        self.scores.append(float(torch.rand(())))
        return self.scores[-1]


# ------------------------------------------------------------------------- ADMM
class Toy(torch.nn.Module):
    def __init__(self, n_out, n_in):
        super().__init__()
        self.fc = torch.nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.fc(x)


def _toy_problem(n_out=6, n_in=8):
    """loss = ||W - W*||^2 with well separated |W*| (random order and signs)."""
    n = n_out * n_in
    mags = torch.linspace(0.2, 2.0, n)[torch.randperm(n)]
    target = (mags * (torch.randint(0, 2, (n,)) * 2 - 1)).view(n_out, n_in)
    model = Toy(n_out, n_in)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                      max_epochs=None):
        for _ in range(max_steps or 1000):
            optimizers.zero_grad()
            training_step(None, model).backward()
            optimizers.step()

    def step(batch, model):
        return 0.5 * (model.fc.weight - target).square().sum()

    return model, target, TorchEvaluator(training_func, opt, step)


def test_admm_z_is_exactly_sparse_and_masks_keep_largest_weights_at_convergence():
    model, target, ev = _toy_problem()
    sparsity = float(torch.empty(()).uniform_(0.3, 0.7))
    # with loss curvature 1, rho = 1 makes the top-k support ADMM's only fixed point
    # (pruned: W + U = W*/rho; kept: W + U = W*), so convergence must find it
    pruner = ADMMPruner(model, [{"op_names": ["fc"], "sparsity": sparsity, "rho": 1.0}], ev,
                        iterations=8, training_steps=20, rho=1e-4)
    assert pruner.rho_for("fc") == 1.0
    _, masks = pruner.compress()
    n = target.numel()
    k = math.floor(sparsity * n + 0.5)
    z = pruner.Z["fc"]
    assert int((z == 0).sum()) == k                                   # exactly sparse
    assert torch.equal(masks["fc"]["weight"].bool(), z != 0)          # masks = support of Z
    largest = set(torch.topk(target.abs().flatten(), n - k).indices.tolist())
    assert set(masks["fc"]["weight"].flatten().nonzero().flatten().tolist()) == largest
    kept = masks["fc"]["weight"].bool()
    assert torch.allclose(model.fc.weight.detach()[kept], target[kept], atol=0.1)
    assert bool((model.fc.weight.detach()[~kept] == 0).all())


@pytest.mark.parametrize("granularity,entry", [
    ("coarse-grained", {}), ("fine-grained", {"granularity": "block", "block_size": [4, 4]})])
def test_admm_granularity_exact_on_mlp(granularity, entry):
    model = build_mlp()
    ev = make_torch_evaluator(model, make_batches(n=2, seq=3))
    config = [{"op_names": ["fc1", "fc2"], "sparsity": 0.5, **entry}]
    _, masks = ADMMPruner(model, config, ev, iterations=2, training_steps=2,
                          granularity=granularity, rho=1e-3).compress()
    for name in ("fc1", "fc2"):
        w = masks[name]["weight"]
        if "block_size" in entry:
            blocks = w.reshape(w.shape[0] // 4, 4, w.shape[1] // 4, 4).sum((1, 3))
            assert bool(((blocks == 0) | (blocks == 16)).all())
            assert int((blocks == 0).sum()) == math.floor(0.5 * blocks.numel() + 0.5)
        else:
            assert _rows_pruned(w) == math.floor(0.5 * w.shape[0] + 0.5)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"iterations": 0, "training_steps": 1}, ValueError, "iterations must be a positive"),
    ({"iterations": 1}, ValueError, "exactly one of training_steps and training_epochs"),
    ({"iterations": 1, "training_steps": 1, "training_epochs": 1}, ValueError, "exactly one"),
    ({"iterations": 1, "training_steps": 1, "granularity": "fine"}, ValueError,
     "'fine-grained' or 'coarse-grained'"),
    ({"iterations": 1, "training_steps": 1, "rho": -1.0}, ValueError,
     "rho must be a positive number"),
])
def test_admm_bad_arguments_leave_model_unchanged(kwargs, error, match):
    model = build_mlp()
    before = _state(model)
    ev = make_torch_evaluator(model, make_batches(n=1))
    with pytest.raises(error, match=match):
        ADMMPruner(model, [{"sparsity": 0.5}], ev, **kwargs)
    with pytest.raises(ValueError, match=r"config_list\[0\]\['rho'\] must be a positive"):
        ADMMPruner(model, [{"sparsity": 0.5, "rho": 0}], ev, iterations=1, training_steps=1)
    assert _same_state(model, before)


# ---------------------------------------------------------------- AGP / Linear
SCHEDULES = {
    "agp": (AGPPruner, lambda s, t, T: s * (1 - (1 - t / T) ** 3)),
    "linear": (LinearPruner, lambda s, t, T: s * t / T),
}


@pytest.mark.parametrize("algorithm,granularity", [
    ("level", "fine"), ("l1", "out_channel"), ("fpgm", "out_channel")])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedules_followed_per_entry_and_masks_monotone(schedule, algorithm, granularity):
    cls, formula = SCHEDULES[schedule]
    model = build_mlp()
    targets = {"fc1": 0.8, "fc2": 0.8, "fc3": float(torch.empty(()).uniform_(0.3, 0.6))}
    config = [{"op_names": ["fc1", "fc2"], "sparsity": 0.8, "granularity": granularity},
              {"op_names": ["fc3"], "sparsity": targets["fc3"], "granularity": granularity}]
    total = 4
    ev = ScoreEvaluator()
    pruner = cls(model, config, algorithm, total, evaluator=ev)
    _, masks = pruner.compress()
    assert [r.iteration for r in pruner.history] == [1, 2, 3, 4]
    previous = None
    for result in pruner.history:
        for name, s in targets.items():
            w = result.masks[name]["weight"]
            units = w.numel() if granularity == "fine" else w.shape[0]
            pruned = int((w == 0).sum()) if granularity == "fine" else _rows_pruned(w)
            assert pruned == math.floor(formula(s, result.iteration, total) * units + 0.5), \
                (name, result.iteration)
            if previous is not None:                  # pruned weights stay pruned
                assert bool((w <= previous[name]["weight"]).all())
        previous = result.masks
    for name, s in targets.items():                   # final = target, model masked
        w = masks[name]["weight"]
        assert torch.equal(w, pruner.history[-1].masks[name]["weight"])
        assert bool((dict(model.named_modules())[name].weight[w == 0] == 0).all())
    assert len(ev.scores) == total
    assert pruner.get_best_result().score == max(ev.scores)


@pytest.mark.parametrize("algorithm", [
    "level", "l1", "l2", "fpgm", "slim", "apoz", "mean_activation", "taylorfo", "admm"])
def test_every_algorithm_by_name_reaches_its_target(algorithm):
    model = NormMLP() if algorithm == "slim" else build_mlp()
    ev = make_torch_evaluator(model, make_batches(n=2, seq=None if algorithm == "slim" else 3))
    params = {"evaluator": ev, "training_steps": 1}
    params = {"level": {}, "l1": {}, "l2": {}, "fpgm": {}, "admm": {**params, "iterations": 1}
              }.get(algorithm, params)
    amount = {"total_sparsity" if algorithm == "slim" else "sparsity": 0.5}
    pruner = AGPPruner(model, [amount], algorithm, 2, pruning_params=params)
    _, masks = pruner.compress()
    if algorithm == "slim":                 # one global ranking over the norm layers
        total = sum(m["weight"].numel() for m in masks.values())
        zeros = sum(int((m["weight"] == 0).sum()) for m in masks.values())
        assert zeros == math.floor(0.5 * total + 0.5)
        return
    fine = algorithm in ("level", "admm")
    for name, m in masks.items():
        w = m["weight"]
        got = int((w == 0).sum()) if fine else _rows_pruned(w)
        assert got == math.floor(0.5 * (w.numel() if fine else w.shape[0]) + 0.5), name


def test_agp_wraps_a_data_driven_pruner_and_finetunes_under_masks():
    model = build_mlp()
    batches = make_batches(n=2, seq=3)
    ev = make_torch_evaluator(model, batches)
    seen = []

    def finetuner(m):
        ev.train(max_steps=2)          # training must not revive pruned weights
        seen.append({n: (dict(m.named_modules())[n].weight == 0).sum().item() for n in LAYERS})

    pruner = AGPPruner(model, [{"sparsity": 0.6, "granularity": "fine"}], "taylorfo", 2,
                       finetuner=finetuner,
                       pruning_params={"evaluator": ev, "training_steps": 2})
    _, masks = pruner.compress()
    for name in LAYERS:
        w = masks[name]["weight"]
        assert int((w == 0).sum()) == math.floor(0.6 * w.numel() + 0.5)
        assert seen[-1][name] >= int((w == 0).sum())
    assert len(seen) == 2


def test_agp_on_tiny_bert_exact_per_layer():
    model = build_bert()
    config = [{"op_types": ["Linear"], "sparsity": 0.5, "granularity": "fine"}]
    _, masks = AGPPruner(model, config, "l1", 2).compress()
    assert len(masks) == 13           # 2 layers x 6 Linear + the pooler
    for name, entry in masks.items():
        w = entry["weight"]
        assert int((w == 0).sum()) == math.floor(0.5 * w.numel() + 0.5), name
    assert torch.isfinite(run(model, dummy_input("bert"))).all()


def test_intermediate_results_written_only_on_rank_zero(tmp_path, monkeypatch):
    model = build_mlp()
    pruner = LinearPruner(model, [{"sparsity": 0.5}], "l2", 2, log_dir=tmp_path,
                          keep_intermediate_result=True)
    pruner.compress()
    for result in pruner.history:
        saved = load_masks_file(result.masks_path)
        for name in LAYERS:
            assert torch.equal(saved[name]["weight"], result.masks[name]["weight"].cpu())
    other = tmp_path / "rank1"
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    pruner = LinearPruner(build_mlp(), [{"sparsity": 0.5}], "l2", 2, log_dir=other,
                          keep_intermediate_result=True)
    pruner.compress()
    assert not other.exists() and all(r.masks_path is None for r in pruner.history)


def test_iterative_use_step_by_step_matches_compress():
    model = build_mlp()
    twin = build_mlp()
    twin.load_state_dict(model.state_dict())
    a = AGPPruner(model, [{"sparsity": 0.7}], "level", 3)
    b = AGPPruner(twin, [{"sparsity": 0.7}], "level", 3)
    _, masks = a.compress()
    for _ in range(3):
        b.load_masks(b.compute_masks())
    with pytest.raises(RuntimeError, match="all 3 iterations are done"):
        b.compute_masks()
    for name in LAYERS:
        assert torch.equal(masks[name]["weight"], b.get_masks()[name]["weight"])


def test_speedup_resizes_the_final_model():
    model = build_mlp()
    x = dummy_input("mlp")
    n_before = sum(p.numel() for p in model.parameters())
    pruner = AGPPruner(model, [{"op_names": ["fc1"], "sparsity": 0.5}], "l1", 2,
                       speedup=True, dummy_input=x)
    model, _ = pruner.compress()
    assert model.fc1.out_features == 12
    assert sum(p.numel() for p in model.parameters()) < n_before
    assert torch.isfinite(run(model, x)).all()


@pytest.mark.parametrize("args,kwargs,error,match", [
    (("nope", 2), {}, ValueError, "pruning_algorithm must be one of"),
    (("level", 0), {}, ValueError, "total_iteration must be a positive int"),
    (("taylorfo", 2), {}, TypeError, "pruning_params .* do not fit TaylorFOWeightPruner"),
    (("level", 2), {"speedup": True}, ValueError, "speedup=True needs dummy_input"),
    (("level", 2), {"finetuner": 3}, TypeError, "finetuner must be a callable"),
    (("fpgm", 2), {"config": [{"sparsity": 0.5, "granularity": "fine"}]}, ConfigError,
     "does not support granularity 'fine'"),
    (("level", 2), {"config": [{"sparsity": 0.5, "rho": 1.0}]}, ConfigError,
     "unknown key 'rho'"),
])
def test_scheduled_bad_arguments_leave_model_unchanged(args, kwargs, error, match):
    model = build_mlp()
    before = _state(model)
    config = kwargs.pop("config", [{"sparsity": 0.5}])
    with pytest.raises(error, match=match):
        AGPPruner(model, config, *args, **kwargs)
    assert _same_state(model, before)


# --------------------------------------------------------------- LotteryTicket
def test_lottery_ticket_schedule_and_reset_to_initial_weights():
    model = build_mlp()
    initial = _state(model)
    seen = []

    def finetuner(m):
        seen.append({n: dict(m.named_modules())[n].weight.detach().clone() for n in LAYERS})
        with torch.no_grad():           # "training": move every weight
            for p in m.parameters():
                p.add_(torch.randn_like(p))

    s, total = 0.75, 3
    pruner = LotteryTicketPruner(model, [{"sparsity": s}], "level", total,
                                 finetuner=finetuner, pruning_params={})
    _, masks = pruner.compress()
    for t, (result, weights) in enumerate(zip(pruner.history, seen), start=1):
        for name in LAYERS:
            w = result.masks[name]["weight"]
            expected = math.floor((1 - (1 - s) ** (t / total)) * w.numel() + 0.5)
            assert int((w == 0).sum()) == expected
            # the ticket handed to the finetuner: initial values where kept, zero elsewhere
            assert torch.equal(weights[name], initial[f"{name}.weight"] * w)
    assert not _same_state(model, initial)


def test_lottery_ticket_without_reset_keeps_trained_weights():
    model = build_mlp()
    initial = _state(model)
    pruner = LotteryTicketPruner(model, [{"sparsity": 0.5}], "level", 2, reset_weight=False,
                                 finetuner=lambda m: [p.data.mul_(2.0) for p in m.parameters()])
    _, masks = pruner.compress()
    w = masks["fc1"]["weight"].bool()
    assert torch.equal(model.fc1.weight.detach()[w], initial["fc1.weight"][w] * 4.0)


def test_linear_wraps_admm_with_per_entry_rho():
    model = build_mlp()
    ev = make_torch_evaluator(model, make_batches(n=2, seq=3))
    config = [{"op_names": ["fc1", "fc2"], "sparsity": 0.5, "rho": 1e-2},
              {"op_names": ["fc3"], "sparsity": 0.25}]
    pruner = LinearPruner(model, config, "admm", 2,
                          pruning_params={"evaluator": ev, "iterations": 1, "training_steps": 1})
    _, masks = pruner.compress()
    for name, s in (("fc1", 0.5), ("fc2", 0.5), ("fc3", 0.25)):
        w = masks[name]["weight"]
        assert int((w == 0).sum()) == math.floor(s * w.numel() + 0.5)
        half = pruner.history[0].masks[name]["weight"]
        assert int((half == 0).sum()) == math.floor(s / 2 * w.numel() + 0.5)


def test_evaluator_must_return_a_number():
    class Bad:
        def evaluate(self):
            return None

    pruner = AGPPruner(build_mlp(), [{"sparsity": 0.5}], "level", 1, evaluator=Bad())
    with pytest.raises(TypeError, match="must return a number"):
        pruner.compress()


def test_a_torch_evaluator_is_bound_by_the_pruner():
    """NNI 3: the pruner binds the evaluator it is given to the model it prunes."""
    model = build_mlp()
    scores = []
    ev = make_torch_evaluator(model, make_batches(n=1),
                              evaluating_func=lambda m: scores.append(m) or float(len(scores)))
    assert ev.model is None
    pruner = AGPPruner(model, [{"sparsity": 0.5}], "level", 2, evaluator=ev)
    assert ev.model is model
    pruner.compress()
    assert len(scores) == 2 and all(m is model for m in scores)
    assert pruner.get_best_result().score == 2.0


def test_an_evaluator_that_cannot_evaluate_is_refused_before_any_mask():
    model = build_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = make_torch_evaluator(model, make_batches(n=1))  # no evaluating_func
    for cls in (AGPPruner, LinearPruner, LotteryTicketPruner):
        with pytest.raises(ValueError, match="without evaluating_func cannot evaluate"):
            cls(model, [{"sparsity": 0.5}], "level", 2, evaluator=ev)
    assert set(model.state_dict()) == set(before)  # nothing wrapped
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert ev.model is None
