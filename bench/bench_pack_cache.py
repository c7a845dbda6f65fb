"""CPU inference with SparseLinear's blocks stored transposed against packing them per call.

    python bench/bench_pack_cache.py            # the matrix (CPU)
    python bench/bench_pack_cache.py --smoke    # seconds; run in CI

The CPU kernel reads each stored block transposed (a row of its B operand is one output
vector). SparseLinear stores its blocks that way on the CPU (values.transpose(1, 2) is a
contiguous view), so no call packs anything. Packing per call, as row-major storage needs,
costs one read and one write of the stored blocks, b*2*d*K*N bytes, against the product's
2*T*K*N*d FLOPs: a fixed cost per call that matters when T is small (one sequence) and
vanishes for large batches. Per case, interleaved in one run: the module as built
("cached" column: blocks stored transposed) and a copy whose blocks are stored row-major
(the op packs them on every call); gain = per_call / cached; and dense F.linear with the
same weights. Then a BERT-base encoder with every Linear at 70% block sparsity (kernel mode,
FFNs fused) on one sequence of T tokens, the same ways.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import time_interleaved, write_results  # noqa: E402

from sparsekernels import SparseLinear  # noqa: E402
from sparsekernels.nn import SparseFFN  # noqa: E402
from sparsekernels.testing import random_block_mask  # noqa: E402

H, FF = 768, 3072  # BERT-base


def row_major_twin(module):
    """A copy of `module` whose SparseLinear blocks are stored row-major: every call packs."""
    twin = copy.deepcopy(module)
    for m in twin.modules() if isinstance(twin, torch.nn.Module) else ():
        if isinstance(m, SparseLinear):
            m.values.data = m.values.data.contiguous()
    return twin


def timed(module, dense, x, reps: int, twin=None) -> dict[str, float]:
    """Median seconds: stored transposed, packed per call, and the dense baseline."""
    twin = twin if twin is not None else row_major_twin(module)

    def cached():
        return module(x)

    def per_call():
        return twin(x)

    with torch.no_grad():
        torch.testing.assert_close(cached(), per_call())
        torch.testing.assert_close(cached(), dense(x), rtol=1e-4, atol=1e-4)
        return time_interleaved({"cached": cached, "per_call": per_call, "dense": lambda: dense(x)},
                                torch.device("cpu"), reps)


def row(case: str, tokens: int, density: float, t: dict[str, float]) -> dict:
    return {"case": case, "tokens": tokens, "density": density, "dense_ms": t["dense"] * 1e3,
            "cached_ms": t["cached"] * 1e3, "per_call_ms": t["per_call"] * 1e3,
            "gain": t["per_call"] / t["cached"], "vs_dense": t["dense"] / t["cached"]}


def layer(k, n, density):
    mask = random_block_mask((n // 32, k // 32), density)
    return SparseLinear(k, n, (32, 32), block_mask=mask, backend="cpu").eval()


def bert_encoder(tokens: int, smoke: bool):
    """(BERT-base in kernel mode at 70% block sparsity with fused FFNs, the masked dense
    model, input ids for one sequence), built as bench_models builds them."""
    import copy

    import bench_models

    from sparsekernels.speedup import ModelSpeedup

    model, scope = bench_models.build("bert-base", smoke)
    model.eval()
    dummy = bench_models.dummy_for("bert-base", model, 1, tokens)
    masks = bench_models.block_masks(model, scope, 0.7)
    masked = bench_models.apply(copy.deepcopy(model), masks)
    ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(32, 32)).speedup_model()
    return model, masked, dummy["input_ids"]


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--smoke", action="store_true", help="tiny cases; nothing written")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 3 if args.smoke else args.reps
    tokens = [8, 32] if args.smoke else [1, 4, 8, 32, 128, 512, 2048]
    densities = [0.3] if args.smoke else [0.5, 0.3, 0.1]
    k, n = (64, 256) if args.smoke else (H, FF)
    rows = []
    for t in tokens:
        for d in densities:
            x = torch.randn(t, k)
            fc1, fc2 = layer(k, n, d), layer(n, k, d)
            l1, l2 = fc1.to_linear(), fc2.to_linear()
            for name, module, dense in (
                    ("linear", fc1, l1),
                    ("ffn", SparseFFN(fc1, fc2, "gelu").eval(), lambda v: l2(F.gelu(l1(v))))):
                r = row(f"{name} {k}x{n}", t, d, timed(module, dense, x, reps))
                rows.append(r)
                print(f"{name} T={t} d={d}: cached {r['cached_ms']:.3f} ms, per call "
                      f"{r['per_call_ms']:.3f} ms, x{r['gain']:.2f}; x{r['vs_dense']:.2f} dense",
                      flush=True)
    for t in ([16] if args.smoke else [8, 32, 128, 512]):
        model, dense, ids = bert_encoder(t, args.smoke)
        twin = row_major_twin(model)
        r = row("bert-base encoder, 70% blocks, fused FFN" if not args.smoke else "tiny bert", t,
                0.3, timed(lambda i: model(i).last_hidden_state,
                           lambda i: dense(i).last_hidden_state, ids, max(3, reps // 3),
                           twin=lambda i: twin(i).last_hidden_state))
        rows.append(r)
        print(f"bert T={t}: cached {r['cached_ms']:.2f} ms, per call {r['per_call_ms']:.2f} ms, "
              f"x{r['gain']:.2f}; x{r['vs_dense']:.2f} dense", flush=True)
    if args.smoke:
        return 0
    notes = ["- fp32, 32x32 blocks kept at random; eval + no_grad; medians of interleaved reps",
             "- cached: SparseLinear / SparseFFN as built, blocks stored transposed (the kernel's "
             "W.T operand is a view); per_call: a copy with row-major blocks (the op packs on "
             "every call, and below the tile rows takes the few-row dot-product path); "
             "gain = per_call / cached; outputs checked close before timing",
             "- bert-base encoder: bench_models' BERT-base (random weights), every encoder Linear "
             "at 70% block sparsity, ModelSpeedup kernel mode (FFNs fused), one sequence (batch 1)",
             "- dense: the same weights as nn.Linear (F.linear, GELU, F.linear for the FFN; the "
             "encoder: the masked dense model); vs_dense = dense / cached"]
    out = write_results(torch.device("cpu"), "pack_cache",
                        "SparseLinear inference: blocks stored transposed vs packing per call", rows,
                        notes, ["case", "tokens", "density", "dense_ms", "cached_ms", "per_call_ms",
                         "gain", "vs_dense"])
    print(f"wrote {out}/pack_cache.{{csv,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
