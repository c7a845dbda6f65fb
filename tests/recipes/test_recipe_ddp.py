"""The recipe data-parallel: 2 gloo processes on CPU (as torchrun starts them) run the tiny
recipe; both ranks take the same pruning decisions and reach the same accuracies, and rank 0
alone writes the run directory."""

import os
import socket

import torch.multiprocessing as mp

from tests.recipes.test_recipe import tiny


def _worker(rank, world, port, tmp_path, out):
    import torch
    import torch.distributed as dist

    from sparsekernels.recipes.transformer import TransformerRecipe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        config = tiny(tmp_path, "ddp")
        record = TransformerRecipe(config, log=lambda *_: None).run()
        out[rank] = {"points": [(p["stage"], p["sparsity"], p["accuracy"]) for p in record["points"]],
                     "heads": record.get("heads_removed"), "world": dist.get_world_size()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_recipe_runs_data_parallel(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), tmp_path, out), nprocs=2, join=True)
        r0, r1 = dict(out[0]), dict(out[1])
    assert r0["world"] == r1["world"] == 2
    assert r0["heads"] == r1["heads"]  # the same heads removed on both ranks
    assert r0["points"] == r1["points"]  # same masks, same weights: same accuracy everywhere
    stages = [s for s, _, _ in r0["points"]]
    assert stages[0] == "finetuned" and stages[-1] == "final" and "ffn-1" in stages
    run = tmp_path / "ddp"
    assert (run / "record.json").exists() and (run / "report.md").exists()
    assert not list(run.glob("*.tmp"))
