"""SparseLinear and sparsify_: conversion, exactness, training, dtypes, compile, state_dict."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels import SparseLinear, sparsify_
from sparsekernels.ops import _ext
from sparsekernels.testing import assert_close_to_reference

BACKENDS = ["auto", "reference", "cpu"]


def need(backend):
    if backend == "cpu" and not _ext.has_op("bsr_linear", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_from_linear_sparsity_keeps_exact_count_of_largest_blocks(sparsity):
    lin = nn.Linear(192, 128)
    sl = SparseLinear.from_linear(lin, (32, 32), sparsity=sparsity)
    n_blocks = 4 * 6
    assert sl.values.shape[0] == round((1 - sparsity) * n_blocks)
    norms = lin.weight.detach().reshape(4, 32, 6, 32).pow(2).sum((1, 3))
    kept = sl.weight.block_mask()
    if 0 < kept.sum() < n_blocks:
        assert norms[kept].min() >= norms[~kept].max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_linear_mask_equals_masked_linear(backend):
    need(backend)
    lin = nn.Linear(128, 64)
    mask = (torch.rand(64, 128) < 0.02).float()  # NNI element mask: most blocks empty
    mask[:, :16] = 1  # and some full columns
    sl = SparseLinear.from_linear(lin, (16, 16), mask=mask, backend=backend)
    x = torch.randn(4, 9, 128)
    masked = F.linear(x, lin.weight * mask, lin.bias)
    assert torch.equal(sl.weight.to_dense(), (lin.weight * mask).detach())
    ref = F.linear(x.double(), (lin.weight * mask).double(), lin.bias.double())
    assert_close_to_reference(sl(x), ref, masked, reduction=128)


def test_to_linear_round_trip():
    lin = nn.Linear(96, 64)
    sl = SparseLinear.from_linear(lin, (32, 32), sparsity=0.5)
    back = sl.to_linear()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, sl.weight.to_dense())
    assert torch.equal(SparseLinear.from_linear(back, (32, 32)).weight.to_dense(), back.weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_updates_only_stored_blocks(backend):
    need(backend)
    torch.manual_seed(torch.initial_seed() % 2**31)
    sl = SparseLinear.from_linear(nn.Linear(64, 64), (16, 16), sparsity=0.5, backend=backend)
    mask = sl.weight.block_mask()
    opt = torch.optim.SGD(sl.parameters(), lr=0.1)
    x, target = torch.randn(32, 64), torch.randn(32, 64)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(sl(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    dense = sl.weight.to_dense().reshape(4, 16, 4, 16).permute(0, 2, 1, 3)
    assert torch.all(dense[~mask] == 0)  # pruned blocks stay pruned


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trainable_bias_alone_gets_its_gradient(backend):
    """Frozen blocks, trainable bias (BitFit): the call must record the bias's gradient (an
    eager fast path that looked only at x and the blocks returned a graph-less output)."""
    need(backend)
    sl = SparseLinear.from_linear(nn.Linear(64, 32), (16, 16), sparsity=0.5, backend=backend)
    sl.values.requires_grad_(False)
    x = torch.randn(5, 64)
    g = torch.randn(5, 32)
    (sl(x) * g).sum().backward()
    torch.testing.assert_close(sl.bias.grad, g.sum(0))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64), (97, 64), (2, 3, 64)], ids=["T1", "T97", "3d"])
def test_dtypes_and_shapes(backend, dtype, shape):
    need(backend)
    sl = SparseLinear.from_linear(nn.Linear(64, 128), (32, 16), sparsity=0.5, backend=backend).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    y = sl(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 128)
    w = sl.weight.to_dense()
    ref = F.linear(x.double(), w.double(), sl.bias.double())
    assert_close_to_reference(y, ref, F.linear(x, w, sl.bias), reduction=64)


def test_torch_compile_same_output():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    sparsify_(model, (32, 32), sparsity=0.5, backend="reference")
    x = torch.randn(4, 64)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    # and gradients flow through the compiled graph
    compiled(x).sum().backward()
    assert model[0].values.grad is not None


def test_torch_compile_keeps_auto_routing(monkeypatch):
    monkeypatch.setenv("SPARSEKERNELS_DENSE_CROSSOVER", "0.4")
    sl = SparseLinear.from_linear(nn.Linear(64, 64), (32, 32), sparsity=0.25)  # density 0.75
    x = torch.randn(3, 64)
    eager = sl(x)  # routed dense when built (the variable is read then)
    assert sl.route.dense is True
    calls = []
    real = torch.ops.sparsekernels.bsr_linear
    monkeypatch.setattr(torch.ops.sparsekernels, "bsr_linear",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    compiled = torch.compile(sl, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    assert calls == []


@pytest.mark.slow
def test_torch_compile_inductor():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    sparsify_(model, (32, 32), sparsity=0.5)
    x = torch.randn(4, 64)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_state_dict_round_trip_with_different_layout():
    a = SparseLinear.from_linear(nn.Linear(64, 64), (16, 16), sparsity=0.25)
    b = SparseLinear.from_linear(nn.Linear(64, 64), (16, 16), sparsity=0.75)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 64)
    torch.testing.assert_close(b(x), a(x))
    assert b.values.shape == a.values.shape


def test_dense_cache_follows_updates():
    sl = SparseLinear.from_linear(nn.Linear(32, 32), (16, 16), sparsity=0.0)  # density 1: dense path
    x = torch.randn(3, 32)
    with torch.no_grad():
        y1 = sl(x)
        sl.values.mul_(2)
        y2 = sl(x)
    torch.testing.assert_close(y2 - sl.bias, 2 * (y1 - sl.bias))


def test_sparsify_swaps_linears_and_matches():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 3))
    masked = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="left dense.*3"):
        sparsify_(model, (32, 32), sparsity=0.5)
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert isinstance(model[3], nn.Linear)  # 3 outputs: not divisible, left dense
    for i in (0, 2):
        masked[i].weight.data = model[i].weight.to_dense()
    x = torch.randn(7, 64)
    torch.testing.assert_close(model(x), masked(x))


def test_sparsify_filter_fn_and_validation_before_mutation():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer '1'.*not divisible"):
        sparsify_(model, (32, 32), sparsity=0.5, filter_fn=lambda m, name: True)
    assert all(type(m) is nn.Linear for m in model)  # untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sparsify_(model, (32, 32), sparsity=0.5, filter_fn=lambda m, name: name == "0")
    assert isinstance(model[0], SparseLinear) and type(model[1]) is nn.Linear


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(block_size=(32, 24)), ValueError, "unsupported block size"),
    (dict(block_size=(64, 64)), ValueError, "not divisible by block size"),
    (dict(sparsity=1.5), ValueError, r"sparsity must be in \[0, 1\]"),
    (dict(mask=torch.ones(3, 3)), ValueError, "fits neither"),
    (dict(sparsity=0.5, mask=torch.ones(32, 96)), ValueError, "either sparsity or mask"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
])
def test_from_linear_errors(kwargs, error, match):
    kwargs.setdefault("block_size", (32, 32))
    with pytest.raises(error, match=match):
        SparseLinear.from_linear(nn.Linear(96, 32), **kwargs)


def test_forward_errors():
    sl = SparseLinear.from_linear(nn.Linear(64, 32), (32, 32), sparsity=0.5)
    with pytest.raises(ValueError, match="wrong input width"):
        sl(torch.randn(2, 63))
    with pytest.raises(TypeError, match="dtype mismatch"):
        sl(torch.randn(2, 64, dtype=torch.float64))


@pytest.mark.parametrize("grid, sparsity", [((1, 5), 0.3), ((1, 5), 0.5), ((2, 5), 0.25),
                                            ((1, 2), 0.25), ((1, 4), 0.125), ((3, 2), 0.75)])
def test_from_linear_keeps_as_many_blocks_as_the_block_pruner(grid, sparsity):
    """One rounding rule (half up) for SparseLinear.from_linear and the pruners: the .5 cases,
    where round() (half to even) and floor(x + 0.5) disagree."""
    from sparsekernels.pruning import LevelPruner

    linear = nn.Linear(grid[1] * 16, grid[0] * 16)
    sl = SparseLinear.from_linear(linear, (16, 16), sparsity=sparsity)
    model = nn.Sequential(copy.deepcopy(linear))
    _, masks = LevelPruner(model, [{"op_names": ["0"], "sparsity": sparsity,
                                    "granularity": "block", "block_size": [16, 16]}]).compress()
    pruner_kept = int(masks["0"]["weight"].reshape(grid[0], 16, grid[1], 16)
                      .amax(dim=(1, 3)).count_nonzero())
    n = grid[0] * grid[1]
    assert sl.values.shape[0] == pruner_kept == n - int(sparsity * n + 0.5)
