"""WandaPruner and SparseGPTPruner on single layers: reconstruction quality, the OBS update
against a plain float64 reference, exact N:M patterns and sparsities, and bad input refused
before anything changes."""

import math

import pytest
import torch

from sparsekernels.formats.block_sparse import units_to_prune
from sparsekernels.pruning import (
    ConfigError, L1NormPruner, LevelPruner, SparseGPTPruner, WandaPruner, parse_config_list)
from sparsekernels.pruning.granularity import RowGroupPool, spread_counts
from sparsekernels.pruning.pruners.obs import ObsPattern, sparsegpt_prune

PRUNERS = {"magnitude": LevelPruner, "wanda": WandaPruner, "sparsegpt": SparseGPTPruner}


def activations(n, d, outliers=4, scale=20.0):
    """Correlated features (fewer latent factors, as real activations) with a few of much
    larger norm (the outlier features LLMs have)."""
    latent = d // 4
    x = torch.randn(n, latent) @ torch.randn(latent, d) / latent ** 0.5 + 0.3 * torch.randn(n, d)
    x[:, torch.randperm(d)[:outliers]] *= scale
    return x


def make(name, model, config_list, calibration):
    if name == "magnitude":
        return LevelPruner(model, config_list)
    return PRUNERS[name](model, config_list, calibration)


# ------------------------------------------------------------------ reconstruction quality
@pytest.mark.parametrize("granularity", ["fine", "2:4"])
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(granularity):
    d_in, d_out = 128, 64
    layer = torch.nn.Linear(d_in, d_out)
    x = activations(1024, d_in)
    with torch.no_grad():
        reference = layer(x)
    entry = {"op_types": ["Linear"], "granularity": granularity}
    if granularity == "fine":
        entry["sparsity"] = 0.5
    errors = {}
    for name in PRUNERS:
        model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
        model[0].load_state_dict(layer.state_dict())
        _, masks = make(name, model, [entry], list(x.split(256))).compress()
        assert (masks["0"]["weight"] == 0).float().mean() == 0.5
        with torch.no_grad():
            errors[name] = float((model(x) - reference).square().sum())
    # measured over many seeds: sparsegpt/wanda <= 0.45, wanda/magnitude <= 0.12
    assert errors["sparsegpt"] < 0.7 * errors["wanda"], errors
    assert errors["wanda"] < 0.3 * errors["magnitude"], errors


# ----------------------------------------------------------- OBS against a plain reference
def reference_sparsegpt(W, H, pattern, blocksize, percdamp):
    """SparseGPT in float64, one column at a time, no lazy batches: each column's pruned
    weights are removed and their error moved onto the columns to its right through the
    inverse Hessian's Cholesky row; masks chosen as the method says."""
    W = W.double().clone()
    rows, cols = W.shape
    H = H.double().clone()
    H[range(cols), range(cols)] += percdamp * torch.diagonal(H).mean()
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    s = pattern.sparsity
    unit = {"fine": 1, "nm": pattern.group, "block": pattern.block[1]}[pattern.kind]
    step = max(unit, blocksize // unit * unit)
    if pattern.kind == "block":     # blocks per column group: the layer's cheapest, dense W
        bm, bk = pattern.block
        errors = {}
        for r0 in range(0, rows, bm):
            for c0 in range(0, cols, bk):
                Z = W[r0:r0 + bm, c0:c0 + bk] @ torch.linalg.inv(U[c0:c0 + bk, c0:c0 + bk])
                errors[(r0, c0)] = float((Z ** 2).sum())
        cheapest = sorted(errors, key=errors.get)[:math.floor(s * len(errors) + 0.5)]
        group_count = {c0: sum(1 for _, c in cheapest if c == c0) for c0 in range(0, cols, bk)}
    for i in range(cols):
        if pattern.kind == "fine" and i % step == 0:
            end = min(i + step, cols)
            k = math.floor(s * rows * end + 0.5) - math.floor(s * rows * i + 0.5)
            score = (W[:, i:end] / torch.diagonal(U)[i:end]) ** 2
            worst = torch.argsort(score.flatten())[:k]
            block = torch.zeros(score.numel(), dtype=torch.bool)
            block[worst] = True
            pruned[:, i:end] = block.view(rows, end - i)
        if pattern.kind == "nm" and i % pattern.group == 0:
            g = slice(i, i + pattern.group)
            score = (W[:, g] / torch.diagonal(U)[g]) ** 2
            drop = round(s * pattern.group)
            for r in range(rows):
                pruned[r, i + torch.argsort(score[r])[:drop]] = True
        if pattern.kind == "block" and i % pattern.block[1] == 0:
            bm, bk = pattern.block
            g = slice(i, i + bk)
            per_group = rows // bm
            k = group_count[i]
            Z = W[:, g] @ torch.linalg.inv(U[g, g])
            err = (Z ** 2).sum(1).view(per_group, bm).sum(1)
            for b in torch.argsort(err)[:k]:
                pruned[b * bm:(b + 1) * bm, g] = True
        err = torch.where(pruned[:, i], W[:, i], torch.zeros(())) / U[i, i]
        W[:, i:] -= torch.outer(err, U[i, i:])
        W[:, i] = torch.where(pruned[:, i], torch.zeros(()), W[:, i])
    return W, ~pruned


@pytest.mark.parametrize("pattern", [ObsPattern("fine", 0.5), ObsPattern("fine", 0.3),
                                     ObsPattern("nm", 0.5, group=4),
                                     ObsPattern("nm", 0.75, group=8),
                                     ObsPattern("block", 0.5, block=(4, 8))],
                         ids=["fine50", "fine30", "2:4", "2:8", "block4x8"])
@pytest.mark.parametrize("blocksize", [16, 128], ids=["lazy16", "lazy128"])
def test_obs_update_matches_float64_reference(pattern, blocksize):
    rows, cols = 24, 48
    W = torch.randn(rows, cols, dtype=torch.float64)
    x = activations(400, cols).double()
    H = 2 * x.T @ x / x.shape[0]
    got, keep = sparsegpt_prune(W, H, pattern, blocksize=blocksize, percdamp=0.01)
    want, want_keep = reference_sparsegpt(W, H, pattern, blocksize, 0.01)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.all(got[~keep] == 0)
    assert int((~keep).sum()) == units_to_prune(rows * cols, pattern.sparsity)


def test_obs_blocks_spare_a_column_group_that_matters():
    """An outlier feature: one group of inputs far larger than the rest keeps all of its
    blocks (a per-group share would take half of them), the layer prunes exactly its share,
    and its output error is below pruning the same number of blocks from every group."""
    rows, cols, bm, bk = 32, 64, 8, 8
    W = torch.randn(rows, cols, dtype=torch.float64)
    x = activations(600, cols).double()
    hot = torch.randint(0, cols // bk, ()).item()
    x[:, hot * bk:(hot + 1) * bk] *= 30.0
    H = 2 * x.T @ x / x.shape[0]
    got, keep = sparsegpt_prune(W, H, ObsPattern("block", 0.5, block=(bm, bk)), percdamp=0.01)
    kept_blocks = keep.view(rows // bm, bm, cols // bk, bk).all(3).all(1)   # [row b, col g]
    assert bool(kept_blocks[:, hot].all())
    assert int((~kept_blocks).sum()) == units_to_prune(kept_blocks.numel(), 0.5)
    uniform, _ = reference_uniform_blocks(W, H, bm, bk, 0.5)
    error = ((x @ (got - W).T) ** 2).sum()
    assert error < 0.5 * ((x @ (uniform - W).T) ** 2).sum()


def reference_uniform_blocks(W, H, bm, bk, s):
    """Half of every column group's blocks (the lowest OBS error per group), with the
    exact OBS update of the columns to the right: the allocation the layer-wide one beats."""
    W = W.double().clone()
    rows, cols = W.shape
    H = H.double().clone()
    H[range(cols), range(cols)] += 0.01 * torch.diagonal(H).mean()
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        if i % bk == 0:
            g = slice(i, i + bk)
            err = ((W[:, g] @ torch.linalg.inv(U[g, g])) ** 2).sum(1).view(-1, bm).sum(1)
            for b in torch.argsort(err)[:round(s * rows / bm)]:
                pruned[b * bm:(b + 1) * bm, g] = True
        err = torch.where(pruned[:, i], W[:, i], torch.zeros(())) / U[i, i]
        W[:, i:] -= torch.outer(err, U[i, i:])
        W[:, i] = torch.where(pruned[:, i], torch.zeros(()), W[:, i])
    return W, ~pruned


def test_obs_float32_close_to_float64():
    W = torch.randn(32, 64)
    x = activations(512, 64)
    H = 2 * x.T @ x / 512
    got, keep = sparsegpt_prune(W, H, ObsPattern("fine", 0.5), blocksize=32)
    want, want_keep = sparsegpt_prune(W.double(), H.double(), ObsPattern("fine", 0.5),
                                      blocksize=32)
    agree = keep == want_keep
    assert agree.float().mean() > 0.99      # near-ties may flip in float32
    rel = (got.double() - want)[agree.all(1)].norm() / want[agree.all(1)].norm()
    assert rel < 1e-4


# ------------------------------------------------------------------------ N:M and amounts
@pytest.mark.parametrize("name", list(PRUNERS))
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_patterns_are_exact(name, pattern):
    n, m = map(int, pattern.split(":"))
    model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    x = activations(256, 32)
    _, masks = make(name, model, [{"op_types": ["Linear"], "granularity": pattern}],
                    [x[:128], x[128:]]).compress()
    for layer, entry in masks.items():
        mask = entry["weight"]
        assert torch.all(mask.view(mask.shape[0], -1, m).sum(-1) == n), layer
        weight = dict(model.named_modules())[layer].weight
        assert torch.all(weight[mask == 0] == 0), layer


def _pruned_units(mask, granularity, block=None):
    if granularity in ("fine",) or ":" in granularity:
        return int((mask == 0).sum()), mask.numel()
    if granularity == "out_channel":
        return int((mask.sum(1) == 0).sum()), mask.shape[0]
    if granularity == "in_channel":
        return int((mask.sum(0) == 0).sum()), mask.shape[1]
    bm, bk = block
    tiles = mask.view(mask.shape[0] // bm, bm, mask.shape[1] // bk, bk).sum((1, 3))
    return int((tiles == 0).sum()), tiles.numel()


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("granularity", ["fine", "block", "out_channel", "in_channel"])
@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_masks_exactly_at_the_requested_sparsity(name, granularity, sparsity):
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.GELU(), torch.nn.Linear(24, 16))
    entry = {"op_types": ["Linear"], "sparsity": sparsity, "granularity": granularity}
    if granularity == "block":
        entry["block_size"] = [8, 8]
    x = activations(300, 40)
    _, masks = make(name, model, [entry], [x[:150], x[150:]]).compress()
    modules = dict(model.named_modules())
    for layer, e in masks.items():
        pruned, units = _pruned_units(e["weight"], granularity, (8, 8))
        assert pruned == units_to_prune(units, sparsity), (layer, pruned, units)
        assert torch.all(modules[layer].weight[e["weight"] == 0] == 0)
        if granularity == "out_channel":
            assert torch.equal(e["bias"], e["weight"].amax(1))


def test_wanda_fine_compares_within_rows():
    model = torch.nn.Sequential(torch.nn.Linear(10, 6))
    x = activations(200, 10, outliers=1)
    _, masks = WandaPruner(model, [{"sparsity": 0.3}], [x]).compress()
    per_row = (masks["0"]["weight"] == 0).sum(1)
    assert int(per_row.sum()) == units_to_prune(60, 0.3)
    assert int(per_row.max() - per_row.min()) <= 1      # 18 over 6 rows of 10: exactly 3


def test_spread_counts_and_row_groups():
    for sizes, s in (([7, 7, 7], 0.5), ([128] * 4 + [64], 0.3), ([4] * 10, 0.75)):
        counts = spread_counts(sizes, s)
        assert int(counts.sum()) == units_to_prune(sum(sizes), s)
        assert all(abs(int(c) - s * z) < 1 for c, z in zip(counts, sizes))
    pool = RowGroupPool("m", (3, 8), 4)
    scores = torch.arange(24.0).flip(0)
    keep = pool.select(scores, 0.5).view(3, 2, 4)
    assert torch.equal(keep.sum(-1), torch.full((3, 2), 2))
    assert torch.equal(keep[0, 0], torch.tensor([True, True, False, False]))


# ------------------------------------------------------------------------- configuration
def test_nm_config_parsing():
    (c,) = parse_config_list([{"granularity": "2:4"}])
    assert c.granularity == "2:4" and c.sparsity == 0.5
    (c,) = parse_config_list([{"granularity": " 4 : 8 ", "sparsity": 0.5}])
    assert c.granularity == "4:8"
    for bad, words in (({"granularity": "3:2"}, "not a valid N:M"),
                       ({"granularity": "0:4"}, "not a valid N:M"),
                       ({"granularity": "4:4"}, "not a valid N:M"),
                       ({"granularity": "2:4", "sparsity": 0.3}, "sparsity of 0.5"),
                       ({"granularity": "2:4", "total_sparsity": 0.5}, "total_sparsity"),
                       ({"granularity": "2-4", "sparsity": 0.5}, "N:M pattern such as")):
        with pytest.raises(ConfigError, match=words):
            parse_config_list([bad])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", [
    ("sparsegpt", [{"granularity": "3:2"}], "ok", ConfigError, "not a valid N:M"),
    ("wanda", [{"granularity": "4:8"}], "ok", ConfigError, "not a multiple of the group size 8"),
    ("sparsegpt", [{"sparsity": 0.5}], "empty", ValueError, "calibration_data is empty"),
    ("wanda", [{"sparsity": 0.5}], "tensor", TypeError, "wrap a single batch in a list"),
    ("wanda", [{"sparsity": 0.5}], "strings", TypeError, r"calibration_data\[0\]"),
    ("wanda", [{"total_sparsity": 0.5}], "ok", ConfigError, "cannot rank units across layers"),
    ("sparsegpt", [{"sparsity": 0.5, "granularity": "block", "block_size": [4, 4]}], "ok",
     ConfigError, "does not tile"),
    ("wanda", [{"sparsity": 0.5, "owl": {"lambda": 0.3}}], "ok", ConfigError, "owl"),
    ("wanda", [{"sparsity": 0.5, "owl": "yes"}], "ok", ConfigError, "owl"),
    ("sparsegpt", [{"op_names": ["0"], "granularity": "2:4", "owl": True}], "ok", ConfigError,
     "owl"),
    ("wanda", [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "ok", ConfigError,
     "cannot prune"),
], ids=["3:2", "width", "empty", "bare-tensor", "bad-item", "global", "block-tiling",
        "owl-lambda", "owl-value", "owl-nm", "conv"])
def test_bad_input_refused_before_anything_changes(case):
    name, config_list, data, error, words = case
    model = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4),
                                torch.nn.Conv2d(1, 1, 1))
    before = _state(model)
    calibration = {"ok": [torch.randn(5, 12)], "empty": [], "tensor": torch.randn(5, 12),
                   "strings": ["text"]}[data]
    with pytest.raises(error, match=words):
        PRUNERS[name](model, config_list, calibration)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sparsegpt_arguments_checked():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    for kwargs, words in (({"percdamp": 0.0}, "percdamp"), ({"blocksize": 0}, "blocksize")):
        with pytest.raises(ValueError, match=words):
            SparseGPTPruner(model, [{"sparsity": 0.5}], [torch.randn(3, 8)], **kwargs)


def test_level_pruner_takes_nm_and_channel_pruners_refuse_it():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    _, masks = LevelPruner(model, [{"granularity": "2:4"}]).compress()
    assert torch.all(masks["0"]["weight"].view(4, 2, 4).sum(-1) == 2)
    with pytest.raises(ConfigError, match="does not support granularity '2:4'"):
        L1NormPruner(torch.nn.Sequential(torch.nn.Linear(8, 4)), [{"granularity": "2:4"}])
