"""CPU inference with SparseLinear's cached W.T blocks against packing them on every call.

    python bench/bench_pack_cache.py            # the matrix (CPU)
    python bench/bench_pack_cache.py --smoke    # seconds; run in CI

The CPU kernel reads each stored block transposed (a row of its B operand is one output
vector). Packing costs one read and one write of the stored blocks, b*2*d*K*N bytes, against
the product's 2*T*K*N*d FLOPs: a fixed cost per call that matters when T is small (one
sequence) and vanishes for large batches. Per case, interleaved in one run: the module
with the cache (what eval + no_grad runs) and the same module with the cache switched off;
gain = per_call / cached. Then a BERT-base encoder with every Linear at 70% block sparsity
(kernel mode, FFNs fused) on one sequence of T tokens, the same two ways.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import time_interleaved, write_results  # noqa: E402

from sparsekernels import SparseLinear  # noqa: E402
from sparsekernels.nn import SparseFFN  # noqa: E402
from sparsekernels.testing import random_block_mask  # noqa: E402

H, FF = 768, 3072  # BERT-base


@contextlib.contextmanager
def per_call_packing():
    """Every SparseLinear packs its blocks per call, as before the cache."""
    saved = SparseLinear.packed
    SparseLinear.packed = lambda self, x: None
    try:
        yield
    finally:
        SparseLinear.packed = saved


def timed_pair(module, x, reps: int) -> tuple[float, float]:
    def cached():
        return module(x)

    def per_call():
        with per_call_packing():
            return module(x)

    with torch.no_grad():
        torch.testing.assert_close(cached(), per_call())  # below 24 rows the routes differ
        t = time_interleaved({"cached": cached, "per_call": per_call}, torch.device("cpu"), reps)
    return t["cached"], t["per_call"]


def layer(k, n, density):
    mask = random_block_mask((n // 32, k // 32), density)
    return SparseLinear(k, n, (32, 32), block_mask=mask, backend="cpu").eval()


def bert_encoder(tokens: int, smoke: bool):
    from transformers import BertConfig, BertModel

    from sparsekernels import sparsify_
    from sparsekernels.nn import fuse_ffn_

    cfg = (BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=256) if smoke else BertConfig())
    model = BertModel(cfg).eval()
    sparsify_(model.encoder, (32, 32), sparsity=0.7, backend="cpu")
    fuse_ffn_(model)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    return model, ids


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
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
            for name, module in (("linear", fc1), ("ffn", SparseFFN(fc1, fc2, "gelu").eval())):
                cached, per_call = timed_pair(module, x, reps)
                rows.append({"case": f"{name} {k}x{n}", "tokens": t, "density": d,
                             "cached_ms": cached * 1e3, "per_call_ms": per_call * 1e3,
                             "gain": per_call / cached})
                print(f"{name} T={t} d={d}: cached {cached * 1e3:.3f} ms, per call "
                      f"{per_call * 1e3:.3f} ms, x{per_call / cached:.2f}", flush=True)
    for t in ([16] if args.smoke else [8, 32, 128, 512]):
        model, ids = bert_encoder(t, args.smoke)
        cached, per_call = timed_pair(lambda i: model(i).last_hidden_state, ids,
                                      max(3, reps // 3))
        rows.append({"case": "bert-base encoder, 70% blocks, fused FFN" if not args.smoke
                     else "tiny bert", "tokens": t, "density": 0.3, "cached_ms": cached * 1e3,
                     "per_call_ms": per_call * 1e3, "gain": per_call / cached})
        print(f"bert T={t}: cached {cached * 1e3:.2f} ms, per call {per_call * 1e3:.2f} ms, "
              f"x{per_call / cached:.2f}", flush=True)
    if args.smoke:
        return 0
    notes = ["- fp32, 32x32 blocks kept at random; eval + no_grad; medians of interleaved reps",
             "- cached: SparseLinear / SparseFFN with the W.T cache (the default in inference); "
             "per_call: the same modules with it switched off (the op packs on every call); "
             "gain = per_call / cached; outputs checked close before timing (bit for bit from 24 "
             "rows; below, per_call takes the few-row dot-product path, cached the tiled kernel)",
             "- bert-base encoder: BertModel(BertConfig()) random weights, every encoder Linear "
             "at 70% block sparsity, FFNs fused (fuse_ffn_), one sequence (batch 1)"]
    out = write_results(torch.device("cpu"), "pack_cache",
                        "SparseLinear inference: cached W.T blocks vs packing per call", rows,
                        notes, ["case", "tokens", "density", "cached_ms", "per_call_ms", "gain"])
    print(f"wrote {out}/pack_cache.{{csv,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
