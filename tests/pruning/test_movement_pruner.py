"""MovementPruner: schedule, exact targets, the movement criterion, granularities, errors."""

import pytest
import torch
import transformers as tf
from torch import nn

from sparsekernels.pruning.evaluator import TorchEvaluator
from sparsekernels.arch import find_attention
from sparsekernels.pruning.pruners.movement import MovementPruner, cubic_schedule


def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                  max_epochs=None, data=None):
    opt = optimizers if isinstance(optimizers, torch.optim.Optimizer) else optimizers[0]
    for step in range(max_steps or 10**9):
        batch = data[step % len(data)]
        opt.zero_grad()
        training_step(batch, model).backward()
        opt.step()


def evaluator_for(model, data, loss_fn, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return TorchEvaluator(lambda *a, **k: training_func(*a, data=data, **k), opt,
                          lambda batch, m: loss_fn(m, batch))


def teacher_task(n_in=8, n_out=8, batches=4):
    """Targets from a teacher whose weights are 0 on a known half: training pushes exactly
    those weights toward zero. The student starts with every weight at magnitude 0.5."""
    teacher = torch.ones(n_out, n_in)
    zero = torch.zeros(n_out * n_in, dtype=torch.bool)
    zero[torch.randperm(n_out * n_in)[: n_out * n_in // 2]] = True
    teacher.view(-1)[zero] = 0
    data = []
    for _ in range(batches):
        x = torch.randn(64, n_in)
        data.append((x, x @ teacher.T))
    student = nn.Sequential(nn.Linear(n_in, n_out, bias=False))
    with torch.no_grad():
        student[0].weight.fill_(0.5)
    return student, data, zero.view(n_out, n_in)


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def test_cubic_schedule():
    assert cubic_schedule(0, 2, 10) == 0 and cubic_schedule(1, 2, 10) == 0
    assert cubic_schedule(6, 2, 10) == pytest.approx(1 - 0.5 ** 3)
    assert cubic_schedule(10, 2, 10) == 1 and cubic_schedule(50, 2, 10) == 1


def test_hard_mode_prunes_what_training_pushes_to_zero_and_follows_the_schedule():
    model, data, zero = teacher_task()
    pruner = MovementPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5}],
                            evaluator_for(model, data, mse), warm_up_step=5,
                            cool_down_beginning_step=25, training_steps=30)
    _, masks = pruner.compress()
    mask = masks["0"]["weight"]
    assert int((mask == 0).sum()) == 32  # exactly the target
    assert torch.equal(mask == 0, zero)  # the weights the loss drove toward zero
    expected = [cubic_schedule(s, 5, 25) for s in range(1, 31)]
    assert pruner.history == pytest.approx(expected)


def test_soft_mode_thresholds_scores():
    model, data, zero = teacher_task()
    pruner = MovementPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5}],
                            evaluator_for(model, data, mse), warm_up_step=2,
                            cool_down_beginning_step=20, training_steps=40, regular_scale=5.0,
                            movement_mode="soft")
    _, masks = pruner.compress()
    mask = next(iter(masks.values()))["weight"]
    pruned = mask == 0
    assert pruned.any()
    assert float(pruned.float().mean()) <= 0.5  # the entry's sparsity caps soft pruning
    # what soft movement prunes is what training pushed toward zero
    assert bool(pruned[~zero].sum() == 0)


def tiny_bert():
    cfg = tf.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        num_hidden_layers=1, vocab_size=40, max_position_embeddings=16)
    model = tf.BertForSequenceClassification(cfg)
    data = [(torch.randint(0, 40, (4, 8)), torch.randint(0, 2, (4,))) for _ in range(3)]

    def loss(m, batch):
        return m(input_ids=batch[0], labels=batch[1]).loss

    return model, data, loss


def test_auto_granularity_prunes_heads_and_ffn_rows_columns():
    model, data, loss = tiny_bert()
    config = [{"op_names_re": [r".*encoder.*(query|key|value|dense)$"], "sparsity": 0.5}]
    pruner = MovementPruner(model, config, evaluator_for(model, data, loss, lr=1e-3),
                            warm_up_step=1, cool_down_beginning_step=3, training_steps=4,
                            sparse_granularity="auto")
    _, masks = pruner.compress()
    block = find_attention(model)[0]
    q = masks[block.q]["weight"]
    heads_kept = q.view(4, 8, 32).amax(dim=(1, 2))
    assert int(heads_kept.sum()) == 2  # 50% of 4 heads, whole heads
    for proj in (block.k, block.v):
        assert torch.equal(masks[proj]["weight"], q)
    o = masks[block.o]["weight"]
    assert torch.equal(o.view(32, 4, 8).amax(dim=(0, 2)), heads_kept)
    ffn1 = masks["bert.encoder.layer.0.intermediate.dense"]["weight"]  # 32 -> 64: rows
    assert torch.all((ffn1 == 0).all(1) | (ffn1 == 1).all(1)) and int((ffn1 == 0).all(1).sum()) == 32
    ffn2 = masks["bert.encoder.layer.0.output.dense"]["weight"]  # 64 -> 32: columns
    assert torch.all((ffn2 == 0).all(0) | (ffn2 == 1).all(0)) and int((ffn2 == 0).all(0).sum()) == 32


def test_block_granularity_gives_sparse_linear_ready_masks():
    from sparsekernels import SparseLinear

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    data = [(torch.randn(16, 64), torch.randn(16, 32)) for _ in range(3)]
    pruner = MovementPruner(model, [{"op_types": ["Linear"], "sparsity": 0.75}],
                            evaluator_for(model, data, mse), warm_up_step=1,
                            cool_down_beginning_step=4, training_steps=5,
                            sparse_granularity="block", block_size=(16, 16))
    _, masks = pruner.compress()
    for name in ("0", "2"):
        mask = masks[name]["weight"]
        blocks = mask.reshape(mask.shape[0] // 16, 16, mask.shape[1] // 16, 16)
        assert torch.all(blocks.amin(dim=(1, 3)) == blocks.amax(dim=(1, 3)))  # whole blocks
        assert float((mask == 0).float().mean()) == 0.75
        sl = SparseLinear.from_linear(model.get_submodule(name), (16, 16), mask=mask)
        assert sl.density == 0.25


@pytest.mark.parametrize("kwargs, match", [
    (dict(warm_up_step=5, cool_down_beginning_step=5), "must be after warm_up_step"),
    (dict(warm_up_step=-1), "non-negative int"),
    (dict(movement_mode="medium"), "movement_mode must be one of"),
    (dict(sparse_granularity="coarse"), "sparse_granularity must be one of"),
    (dict(training_steps=3), "ends before cool_down_beginning_step"),
])
def test_errors(kwargs, match):
    model, data, _ = teacher_task()
    args = dict(warm_up_step=1, cool_down_beginning_step=5, training_steps=10)
    args.update(kwargs)
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        MovementPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5}],
                       evaluator_for(model, data, mse), **args)
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_interrupted_compress_resumes_exactly(mode):
    """state_dict taken mid-training plus the model and optimizer as they were, loaded into
    a new pruner: compress() ends with the scores and masks of a run never stopped."""
    torch.manual_seed(0)
    model, data, _ = teacher_task()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = [{"op_types": ["Linear"], "sparsity": 0.5}]
    kw = dict(warm_up_step=2, cool_down_beginning_step=8, training_steps=12, movement_mode=mode,
              regular_scale=1.0)

    def run(stop_at=None, resume=None):
        model.load_state_dict(resume["model"] if resume else start)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        if resume:
            opt.load_state_dict(resume["opt"])
        offset = resume["pruner"]["step"] if resume else 0
        saved = {}

        def train(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                  max_epochs=None):
            for step in range(max_steps):
                if offset + step == stop_at:
                    saved.update(pruner=pruner.state_dict(), opt=opt.state_dict(),
                                 model={k: v.clone() for k, v in model.state_dict().items()})
                    raise KeyboardInterrupt
                opt.zero_grad()
                training_step(data[(offset + step) % len(data)], model).backward()
                opt.step()

        pruner = MovementPruner(model, config, TorchEvaluator(train, opt, lambda b, m: mse(m, b)),
                                **kw)
        if resume:
            pruner.load_state_dict(resume["pruner"])
        try:
            _, masks = pruner.compress()
        except KeyboardInterrupt:
            return saved
        finally:
            pruner.unwrap_model()  # the next run starts from an unmasked model
        return masks, {n: s.detach().clone() for n, s in pruner.scores.items()}

    want_masks, want_scores = run()
    state = run(stop_at=5)
    assert state["pruner"]["step"] == 5 and len(state["pruner"]["history"]) == 5
    masks, scores = run(resume=state)
    for n in want_scores:
        torch.testing.assert_close(scores[n], want_scores[n], rtol=0, atol=0)
        assert torch.equal(masks[n]["weight"], want_masks[n]["weight"])


def test_state_dict_errors():
    model, data, _ = teacher_task()
    pruner = MovementPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5}],
                            evaluator_for(model, data, mse), warm_up_step=1,
                            cool_down_beginning_step=3, training_steps=4)
    with pytest.raises(RuntimeError, match="only while compress"):
        pruner.state_dict()
    scores = {"0": torch.zeros(8, 8)}
    with pytest.raises(ValueError, match=r"step must be an int in \[0, 4\]"):
        pruner.load_state_dict({"step": 5, "scores": scores})
    with pytest.raises(ValueError, match="load the state of the same model"):
        pruner.load_state_dict({"step": 1, "scores": {"other": torch.zeros(8, 8)}})
    with pytest.raises(ValueError, match=r"scores of 0 have shape \(4, 8\)"):
        pruner.load_state_dict({"step": 1, "scores": {"0": torch.zeros(4, 8)}})
    by_epochs = MovementPruner(model, [{"op_types": ["Linear"], "sparsity": 0.5}],
                               evaluator_for(model, data, mse), warm_up_step=1,
                               cool_down_beginning_step=3, training_epochs=1)
    with pytest.raises(ValueError, match="needs training_steps"):
        by_epochs.load_state_dict({"step": 1, "scores": scores})
