"""TorchEvaluator and TransformersEvaluator: loss patch, step hooks, N steps, evaluate."""

import pytest
import torch
from pruning_models import (
    build_mlp, classification_step, make_batches, make_torch_evaluator, make_training_func)

from sparsekernels.pruning import TorchEvaluator, TransformersEvaluator


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_train_runs_exactly_max_steps_even_if_training_func_ignores_it():
    model = build_mlp()
    batches = make_batches(n=10, seq=5)
    seen = []

    def greedy(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
               max_epochs=None):
        for batch in batches:                   # ignores max_steps
            optimizers.zero_grad()
            training_step(batch, model).backward()
            optimizers.step()
            seen.append(1)

    ev = TorchEvaluator(greedy, torch.optim.SGD(model.parameters(), lr=0.1),
                        classification_step)
    ev.bind_model(model)
    before, after = [], []
    ev.patch_optimizer_step(before=[lambda: before.append(1)], after=[lambda: after.append(1)])
    ev.train(max_steps=3)
    assert len(seen) == 2 and len(before) == 3 and len(after) == 3
    ev.revert_optimizer_step()
    ev.train(max_steps=4)
    assert len(before) == 3


def test_patch_loss_changes_what_is_optimized():
    model = build_mlp()
    ev = make_torch_evaluator(model, make_batches(seq=5))
    ev.bind_model(model)
    batches_seen = []
    ev.patch_loss(lambda loss, batch: batches_seen.append(batch) or loss * 0.0)
    start = _params(model)
    ev.train(max_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(start, _params(model)))
    assert len(batches_seen) == 2 and isinstance(batches_seen[0], tuple)
    ev.revert_loss()
    ev.train(max_steps=2)
    assert not all(torch.equal(a, b) for a, b in zip(start, _params(model)))


def test_evaluate_and_dummy_input():
    model = build_mlp()
    ev = make_torch_evaluator(model, make_batches(), evaluating_func=lambda m: 0.75,
                              dummy_input=torch.ones(1, 12))
    ev.bind_model(model)
    assert ev.evaluate() == 0.75
    assert torch.equal(ev.get_dummy_input(), torch.ones(1, 12))
    with pytest.raises(RuntimeError, match="no evaluating_func"):
        make_torch_evaluator(model, make_batches()).evaluate()


def test_bad_evaluator_arguments():
    model = build_mlp()
    with pytest.raises(TypeError, match="optimizers must be"):
        TorchEvaluator(make_training_func([]), "sgd", classification_step)
    other = torch.optim.SGD(build_mlp().parameters(), lr=0.1)
    ev = TorchEvaluator(make_training_func([]), other, classification_step)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        ev.bind_model(model)
    with pytest.raises(RuntimeError, match="no model bound"):
        TorchEvaluator(make_training_func([]), other, classification_step).train(1)


def _tiny_trainer(tmp_path, model):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments
    data = [{"input_ids": torch.randint(1, 50, (8,)), "labels": torch.tensor(i % 2)}
            for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[],
                             use_cpu=True, per_device_train_batch_size=4,
                             per_device_eval_batch_size=8, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)


def test_transformers_evaluator_hooks_steps_and_patches_loss(tmp_path):
    from pruning_models import build_bert
    model = build_bert(head=True)
    trainer = _tiny_trainer(tmp_path, model)
    ev = TransformersEvaluator(trainer)
    ev.bind_model(model)
    steps, losses = [], []
    ev.patch_optimizer_step(before=[lambda: steps.append(model.classifier.weight.grad is not None)])
    ev.patch_loss(lambda loss, inputs: losses.append(float(loss.detach())) or loss * 0.0)
    start = _params(model)
    ev.train(max_steps=3)
    assert steps == [True, True, True] and len(losses) == 3
    assert trainer.args.max_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(start, _params(model)))
    ev.revert_loss()
    assert "eval_loss" in ev.evaluate()
    with pytest.raises(ValueError, match="trainer.model is not the model"):
        TransformersEvaluator(trainer).bind_model(build_bert(head=True))


def test_taylor_pruner_through_the_hf_trainer(tmp_path):
    from pruning_models import build_bert

    from sparsekernels.pruning import TaylorFOWeightPruner
    model = build_bert(head=True)
    trainer = _tiny_trainer(tmp_path, model)
    pruner = TaylorFOWeightPruner(
        model, [{"op_names_re": [r".*intermediate\.dense"], "sparsity": 0.5}],
        TransformersEvaluator(trainer), training_steps=2)
    keys = list(model.state_dict())
    _, masks = pruner.compress()
    assert all(float(imp.sum()) > 0 for imp in pruner._importance.values())
    for entry in masks.values():
        assert int((entry["weight"].sum(1) == 0).sum()) == 32
    assert list(model.state_dict()) == keys
    assert "eval_loss" in trainer.evaluate()
