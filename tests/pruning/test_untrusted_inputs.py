"""Bad or unusual input to pruning gets a message that says what is expected: masks in
another format, a dummy input that does not fit the model, a total_sparsity the caps cannot
reach, a Taylor training function that never steps."""

import warnings

import pytest
import torch
from pruning_models import build_bert, build_mlp, make_batches, make_torch_evaluator

from sparsekernels.pruning import (LevelPruner, MaskError, TaylorFOWeightPruner, TorchEvaluator,
                                   load_masks_file, save_masks, total_sparsity)
from sparsekernels.arch.trace import find_channel_groups
from sparsekernels.arch.inputs import DummyInputError, run_model
from sparsekernels.formats.masks import validate_masks
from sparsekernels.pruning.wrapper import apply_masks_
from sparsekernels.speedup import ModelSpeedup


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = _state(model)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


# --- masks ------------------------------------------------------------------------------------
BAD_MASKS = [
    ([{"fc1": {"weight": torch.ones(24, 12)}}], "masks must be a dict"),
    ({"fc1": torch.ones(24, 12)}, r"masks\['fc1'\] is a Tensor, not a dict"),
    ({"fc1": [torch.ones(24, 12)]}, r"masks\['fc1'\] is a list, not a dict"),
    ({"fc1": {"weight": [[1.0] * 12] * 24}}, r"'fc1'.weight is a list, not a tensor"),
    ({0: {"weight": torch.ones(24, 12)}}, "is not a module name"),
]


@pytest.mark.parametrize("masks, match", BAD_MASKS, ids=["list", "entry-tensor", "entry-list",
                                                          "mask-list", "int-key"])
def test_masks_in_another_format_say_the_expected_one(masks, match):
    model = build_mlp()
    before = _state(model)
    with pytest.raises(MaskError, match=match) as info:
        validate_masks(model, masks)
    assert "{module_name: {'weight': mask" in str(info.value) or "module name" in str(info.value)
    with pytest.raises(MaskError, match=match):
        apply_masks_(model, masks)
    with pytest.raises(MaskError, match=match):
        LevelPruner(model, [{"sparsity": 0.5}]).load_masks(masks)
    if isinstance(masks, dict):  # a list is refused by ModelSpeedup's own type check
        with pytest.raises(MaskError, match=match):
            ModelSpeedup(model, torch.randn(2, 12), masks).speedup_model()
    assert _unchanged(model, before)


def test_masks_file_mixups_are_named(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; expected the masks file"):
        load_masks_file(tmp_path)
    from safetensors.torch import save_file
    save_file({"weight": torch.ones(3)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(MaskError, match="key 'weight' is not '<module>.<param>'"):
        load_masks_file(tmp_path / "odd.safetensors")
    root = torch.nn.Linear(4, 4)  # masks of the root module are saved as ".weight"
    save_masks({"": {"weight": torch.ones(4, 4)}}, tmp_path / "root.safetensors")
    validate_masks(root, load_masks_file(tmp_path / "root.safetensors"))


# --- dummy_input ------------------------------------------------------------------------------
@pytest.mark.parametrize("dummy, case", [(torch.randn(2, 5), "width"),
                                         (torch.randn(2, 12, dtype=torch.float64), "dtype"),
                                         ({"y": torch.randn(2, 12)}, "keyword")])
def test_dummy_input_that_does_not_fit_says_so(dummy, case):
    model = build_mlp()
    before = _state(model)
    pattern = r"dummy_input does not fit MLP: .*forward takes \(x\); its first layer 'fc1' " \
              r"\(Linear\) reads \[\.\.\., 12\] float32; dummy_input is "
    with pytest.raises(DummyInputError, match=pattern):
        run_model(model, dummy)
    with pytest.raises(DummyInputError, match=pattern):
        find_channel_groups(model, dummy)
    masks = {"fc1": {"weight": torch.ones(24, 12)}}
    with pytest.raises(DummyInputError, match=pattern):
        ModelSpeedup(model, dummy, masks).speedup_model()
    assert _unchanged(model, before)


def test_transformers_model_names_its_main_input():
    model = build_bert(head=True).eval()
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(DummyInputError, match=r"mainly 'input_ids' \(integer token ids.*"
                                              r"'input_ids': Tensor\[2, 8\] float32"):
        run_model(model, {"input_ids": ids.float()})
    run_model(model, {"input_ids": ids})


def test_only_the_first_run_blames_the_dummy_input():
    model = build_mlp()
    x = torch.randn(2, 12)
    run_model(model, x)
    model.fc1.weight.data = torch.randn(24, 7)  # the model broke after a run that fitted
    with pytest.raises(RuntimeError) as info:
        run_model(model, x)
    assert not isinstance(info.value, DummyInputError)


# --- total_sparsity under caps ------------------------------------------------------------------
def test_total_sparsity_capped_below_target_warns_with_the_reached_value():
    model = build_mlp()
    config = [{"op_types": ["Linear"], "total_sparsity": 0.8, "max_sparsity_per_layer": 0.5}]
    with pytest.warns(UserWarning, match=r"total_sparsity=0.8 is not reachable.*a sparsity of "
                                         r"0\.5000"):
        _, masks = LevelPruner(model, config).compress()
    assert total_sparsity(masks) == pytest.approx(0.5, abs=1e-3)
    reachable = [{"op_types": ["Linear"], "total_sparsity": 0.4, "max_sparsity_per_layer": 0.5}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LevelPruner(build_mlp(), reachable).compress()


# --- Taylor without gradients -------------------------------------------------------------------
def _evaluator(model, training_func):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lambda batch, m: torch.nn.functional.cross_entropy(m(batch[0]), batch[1])  # noqa: E731
    return TorchEvaluator(training_func, opt, step)


def test_taylor_refuses_a_training_function_that_never_steps():
    model = build_mlp()

    def no_steps(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                 max_epochs=None):
        pass

    pruner = TaylorFOWeightPruner(model, [{"sparsity": 0.5}], _evaluator(model, no_steps), 3)
    with pytest.raises(RuntimeError, match="never called optimizer.step"):
        pruner.compress()


def test_taylor_refuses_steps_without_gradients():
    model = build_mlp()

    def steps_only(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                   max_epochs=None):
        for _ in range(max_steps):
            optimizers.zero_grad()
            optimizers.step()

    pruner = TaylorFOWeightPruner(model, [{"sparsity": 0.5}], _evaluator(model, steps_only), 3)
    with pytest.raises(RuntimeError, match="no pruned layer had a gradient"):
        pruner.compress()
    working = TaylorFOWeightPruner(model, [{"sparsity": 0.5}],
                                   make_torch_evaluator(model, make_batches(n=2)), 2)
    working.compress()
