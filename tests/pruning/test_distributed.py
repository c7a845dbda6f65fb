"""Data-parallel pruning: 2 gloo processes on CPU give identical masks on both ranks, equal
to a single-process run on the same data, and only rank 0 writes files."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparsekernels.pruning import (ActivationMeanRankPruner, MovementPruner, TaylorFOWeightPruner,
                                   TorchEvaluator)

STEPS = 6


def make_problem():
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    teacher = torch.randn(8, 16)
    batches = []
    for _ in range(3):
        x = torch.randn(32, 16)
        batches.append((x, x @ teacher.T))
    return model, batches


def run_pruners(model, batches, shard=None):
    """Masks of three data-driven pruners; `shard` = (rank, world) takes a slice of every batch."""
    def local(batch):
        if shard is None:
            return batch
        rank, world = shard
        n = batch[0].shape[0] // world
        return tuple(t[rank * n:(rank + 1) * n] for t in batch)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                      max_epochs=None):
        net = DistributedDataParallel(model) if shard is not None else model
        for step in range(max_steps):
            optimizers.zero_grad()
            training_step(local(batches[step % len(batches)]), net).backward()
            optimizers.step()

    def step(batch, net):
        x, y = batch
        return nn.functional.mse_loss(net(x), y)

    results = {}
    for name, make in {
        "movement": lambda m, ev: MovementPruner(m, [{"op_types": ["Linear"], "sparsity": 0.5}], ev,
                                                 warm_up_step=1, cool_down_beginning_step=4,
                                                 training_steps=STEPS),
        "taylor": lambda m, ev: TaylorFOWeightPruner(m, [{"op_types": ["Linear"], "sparsity": 0.5}],
                                                     ev, training_steps=STEPS),
        "activation": lambda m, ev: ActivationMeanRankPruner(
            m, [{"op_names": ["0"], "sparsity": 0.5}], ev, training_steps=STEPS, activation="gelu"),
    }.items():
        m = make_problem()[0]
        m.load_state_dict(model.state_dict())
        ev = TorchEvaluator(training_func, torch.optim.SGD(m.parameters(), lr=0.05), step)
        pruner = make(m, ev)
        _, masks = pruner.compress()
        results[name] = {k: v["weight"].clone() for k, v in masks.items()}
        results[f"{name}_pruner"] = pruner
    return results


def run_distiller(shard=None):
    """Three steps of DDP(distiller) (or the plain distiller) on a tiny BERT."""
    import transformers as tf

    from sparsekernels.distill import DynamicLayerwiseDistiller

    torch.manual_seed(99)
    cfg = tf.BertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        num_hidden_layers=2, vocab_size=30, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = tf.BertForSequenceClassification(cfg)
    student = tf.BertForSequenceClassification(cfg)
    ids, labels = torch.randint(0, 30, (8, 6)), torch.randint(0, 2, (8,))
    if shard is not None:
        rank, world = shard
        n = 8 // world
        ids, labels = ids[rank * n:(rank + 1) * n], labels[rank * n:(rank + 1) * n]
    distiller = DynamicLayerwiseDistiller(student, teacher)
    net = DistributedDataParallel(distiller) if shard is not None else distiller
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in distiller.state_dict().items()}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, batches = make_problem()
        results = run_pruners(model, batches, shard=(rank, world))
        flat = {f"{p}/{k}": v for p in ("movement", "taylor", "activation")
                for k, v in results[p].items()}
        torch.save(flat, os.path.join(out_dir, f"masks_rank{rank}.pt"))
        torch.save(run_distiller((rank, world)), os.path.join(out_dir, f"distiller_rank{rank}.pt"))
        # export: every rank calls it, rank 0 alone writes
        results["movement_pruner"].export_model(os.path.join(out_dir, f"model_from_rank{rank}.st"),
                                                os.path.join(out_dir, f"masks_from_rank{rank}.st"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_masks_match_across_ranks_and_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "masks_rank0.pt")
    r1 = torch.load(tmp_path / "masks_rank1.pt")
    assert r0.keys() == r1.keys() and len(r0) == 5
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k}: masks differ across ranks"
    model, batches = make_problem()
    single = run_pruners(model, batches)
    for k, v in r0.items():
        pruner, name = k.split("/")
        assert torch.equal(v, single[pruner][name]), f"{k}: DDP and single-process masks differ"
    assert (tmp_path / "model_from_rank0.st").exists() and (tmp_path / "masks_from_rank0.st").exists()
    assert not (tmp_path / "model_from_rank1.st").exists()
    assert not (tmp_path / "masks_from_rank1.st").exists()
    d0, d1 = torch.load(tmp_path / "distiller_rank0.pt"), torch.load(tmp_path / "distiller_rank1.pt")
    d_single = run_distiller()
    assert any("layer_map" in k for k in d0)
    for k in d0:
        assert torch.equal(d0[k], d1[k]), f"distiller {k} differs across ranks"
        torch.testing.assert_close(d0[k], d_single[k], rtol=1e-4, atol=1e-5)
