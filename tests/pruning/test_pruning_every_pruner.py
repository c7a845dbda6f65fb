"""Every pruner reaches the requested amount exactly, per layer and globally."""

import math

import pytest
import torch
from pruning_models import NormMLP, build_mlp, dummy_input, make_batches, make_torch_evaluator, run

from sparsekernels.pruning import (
    ActivationAPoZRankPruner, ActivationMeanRankPruner, FPGMPruner, L1NormPruner,
    L2NormPruner, LevelPruner, SlimPruner, TaylorFOWeightPruner)

WEIGHT = {"Level": LevelPruner, "L1Norm": L1NormPruner, "L2Norm": L2NormPruner,
          "FPGM": FPGMPruner}
DATA = {"TaylorFOWeight": TaylorFOWeightPruner, "ActivationAPoZRank": ActivationAPoZRankPruner,
        "ActivationMeanRank": ActivationMeanRankPruner}


def _make(name, model, config_list):
    if name in WEIGHT:
        return WEIGHT[name](model, config_list)
    ev = make_torch_evaluator(model, make_batches(n=3, seq=5))
    return DATA[name](model, config_list, ev, training_steps=3)


def _units(mask, fine):
    if fine:
        return int((mask == 0).sum()), mask.numel(), 1
    rows = mask.reshape(mask.shape[0], -1)
    return int((rows.sum(1) == 0).sum()), rows.shape[0], rows.shape[1]


@pytest.mark.parametrize("name", list(WEIGHT) + list(DATA))
@pytest.mark.parametrize("sparsity", [0.25, 0.6])
def test_per_layer_exact(name, sparsity):
    model = build_mlp()
    x = dummy_input("mlp")
    _, masks = _make(name, model, [{"sparsity": sparsity}]).compress()
    assert set(masks) == {"fc1", "fc2", "fc3"}
    for layer, entry in masks.items():
        pruned, units, _ = _units(entry["weight"], name == "Level")
        assert pruned == math.floor(sparsity * units + 0.5), layer
    assert torch.isfinite(run(model, x)).all()


@pytest.mark.parametrize("name", list(WEIGHT) + list(DATA))
def test_global_within_one_unit_and_capped(name):
    model = build_mlp()
    _, masks = _make(name, model, [{"total_sparsity": 0.5, "max_sparsity_per_layer": 0.7}]
                     ).compress()
    fine = name == "Level"
    total = sum(e["weight"].numel() for e in masks.values())
    zeros = sum(int((e["weight"] == 0).sum()) for e in masks.values())
    widest = max(_units(e["weight"], fine)[2] for e in masks.values())
    assert abs(zeros - math.floor(0.5 * total + 0.5)) <= widest
    for layer, entry in masks.items():
        pruned, units, _ = _units(entry["weight"], fine)
        assert pruned <= math.floor(0.7 * units), layer


@pytest.mark.parametrize("amount", [{"sparsity": 0.5}, {"total_sparsity": 0.5}])
def test_slim_exact(amount):
    model = NormMLP()
    mode = "global" if "total_sparsity" in amount else "normal"
    _, masks = SlimPruner(model, [{"op_types": ["LayerNorm", "BatchNorm1d"], **amount}],
                          make_torch_evaluator(model, make_batches(n=3)), training_steps=2,
                          mode=mode).compress()
    zeros = {n: int((e["weight"] == 0).sum()) for n, e in masks.items()}
    if mode == "normal":
        assert zeros == {"ln": 8, "bn": 8}
    else:
        assert sum(zeros.values()) == 16
