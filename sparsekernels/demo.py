"""The quick demo: a BERT-base FFN (768 -> 3072 -> GELU -> 768, random weights) pruned to
block sparsity 0.5 / 0.7 / 0.9 with sparsify_, checked against the masked dense FFN, and
timed against dense and against the physically resized FFN.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from sparsekernels.nn.sparse_linear import SparseLinear, sparsify_
from sparsekernels.ops.router import route


def _ffn(hidden: int = 768, inner: int = 3072) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))


def _resized(ffn: nn.Module, keep: float) -> nn.Module:
    """A dense FFN with the kept fraction of inner units: what structural pruning gives."""
    inner = max(32, round(ffn[0].out_features * keep / 32) * 32)
    return _ffn(ffn[0].in_features, inner)


def _time(fns: dict, reps: int) -> dict:
    samples = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def run(tokens: int = 1024, block: int = 32, sparsities=(0.5, 0.7, 0.9), reps: int = 10,
        threads: int | None = None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dense = _ffn().eval()
    x = torch.randn(tokens, 768)
    kernel = route("bsr_linear", x.device, x.dtype).backend.value
    print(f"BERT-base FFN 768->3072->768, {tokens} tokens, fp32, block {block}x{block}, "
          f"{torch.get_num_threads()} threads, kernel backend: {kernel}")
    print(f"{'sparsity':>8} | {'dense ms':>9} | {'sparse ms':>9} | {'speedup':>7} | "
          f"{'resized ms':>10} | {'vs resized':>10} | {'max rel err':>11}")
    rows = []
    with torch.no_grad():
        for s in sparsities:
            sparse = sparsify_(copy.deepcopy(dense), (block, block), sparsity=s)
            masked = copy.deepcopy(dense)
            for i in (0, 2):
                assert isinstance(sparse[i], SparseLinear)
                masked[i].weight.copy_(sparse[i].weight.to_dense())
            ref = masked(x)
            err = ((sparse(x) - ref).abs().max() / ref.abs().max()).item()
            resized = _resized(dense, 1 - s).eval()
            t = _time({"dense": lambda: dense(x), "sparse": lambda: sparse(x),
                       "resized": lambda: resized(x)}, reps)
            row = {"sparsity": s, "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3,
                   "speedup": t["dense"] / t["sparse"], "resized_ms": t["resized"] * 1e3,
                   "vs_resized": t["resized"] / t["sparse"], "max_rel_err": err}
            rows.append(row)
            print(f"{s:>8.2f} | {row['dense_ms']:>9.2f} | {row['sparse_ms']:>9.2f} | "
                  f"{row['speedup']:>6.2f}x | {row['resized_ms']:>10.2f} | "
                  f"{row['vs_resized']:>9.2f}x | {err:>11.1e}")
    print("speedup = dense / sparse; vs resized = resized dense FFN / sparse (1.0 means the "
          "block-sparse FFN is as fast as the physically smaller one)")
    return rows
