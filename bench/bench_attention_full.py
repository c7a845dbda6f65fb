"""All-true attention layouts on the CPU: our block-sparse kernel vs dense SDPA, per dtype
and key length, and the key length from which SDPA wins (the router's crossover).

    python bench/bench_attention_full.py                    # writes attention_full.{csv,md}
    python bench/bench_attention_full.py --write-crossover  # also ops/crossover.json
    python bench/bench_attention_full.py --smoke            # seconds (CI)

An unpruned attention layer in kernel mode (every head kept) has an all-true layout. Auto
runs it as torch's SDPA from the measured key length on (`attention_full_layout` in
ops/crossover.json: the shortest key length at which SDPA was faster in this run, for
every longer one as well); below it, our kernel. Cases: 12 heads of 64, batch 1024 / L
(about one BERT batch of tokens), with and without a padding mask (one sequence a quarter
padding), forward only, inference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import time_interleaved, write_results  # noqa: E402

from sparsekernels.ops.block_sparse_attention import block_sparse_attention  # noqa: E402

HEADS, HEAD_DIM, TOKENS, BLOCK = 12, 64, 1024, 64
CROSSOVER_KEY = "attention_full_layout"


def run_case(length: int, dtype: torch.dtype, masked: bool, reps: int) -> dict:
    batch = max(1, TOKENS // length)
    q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM).to(dtype) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        mask[0, ..., length * 3 // 4:] = False
    nb = -(-length // BLOCK)
    layout = torch.ones(HEADS, nb, nb, dtype=torch.bool)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
           "ours": lambda: block_sparse_attention(q, k, v, layout, (BLOCK, BLOCK), attn_mask=mask,
                                                  backend="cpu")}
    with torch.no_grad():
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        err = {n: float((f().double() - want).norm() / want.norm()) for n, f in fns.items()}
        t = time_interleaved(fns, torch.device("cpu"), reps=reps)
    return {"dtype": str(dtype).replace("torch.", ""), "seq_len": length, "batch": batch,
            "padding_mask": masked, "sdpa_ms": 1e3 * t["sdpa"], "ours_ms": 1e3 * t["ours"],
            "ours_vs_sdpa": t["sdpa"] / t["ours"], "ours_rel_err": err["ours"],
            "sdpa_rel_err": err["sdpa"]}


def crossover(rows: list[dict]) -> dict[str, int]:
    """Per dtype, the shortest measured key length from which SDPA is faster (masked or not)
    at it and at every longer one; 0 (always SDPA) when the kernel never wins throughout."""
    out = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        lengths = sorted({r["seq_len"] for r in rows if r["dtype"] == dtype})
        ours_wins = {n: all(r["ours_vs_sdpa"] > 1.0 for r in rows
                            if r["dtype"] == dtype and r["seq_len"] == n) for n in lengths}
        start = 0
        for n in lengths:  # the first length after the last win of the kernel
            if ours_wins[n]:
                start = None
            elif start is None:
                start = n
        out[dtype] = lengths[-1] * 2 if start is None else start
    return out


def write_crossover(measured: dict[str, int]) -> None:
    path = Path(__file__).resolve().parents[1] / "sparsekernels" / "ops" / "crossover.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(CROSSOVER_KEY, {}).setdefault("cpu", {}).update(measured)
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}: {table[CROSSOVER_KEY]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="two short cases, seconds (CI)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--lengths", default="64,128,256,512,1024,2048")
    p.add_argument("--write-crossover", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [64, 128] if args.smoke else [int(x) for x in args.lengths.split(",")]
    rows = []
    for length in lengths:
        for dtype in (torch.float32, torch.bfloat16):
            for masked in (False, True):
                row = run_case(length, dtype, masked, 2 if args.smoke else args.reps)
                rows.append(row)
                print(f"L={length} {row['dtype']} mask={masked}: SDPA {row['sdpa_ms']:.2f} ms, "
                      f"ours {row['ours_ms']:.2f} ms (x{row['ours_vs_sdpa']:.2f})", flush=True)
    if args.smoke:
        return 0
    measured = crossover(rows)
    notes = [f"- {HEADS} heads of {HEAD_DIM}, batch {TOKENS} / L, layout blocks {BLOCK}x{BLOCK}, "
             "all true; forward, no grad; padding_mask: one sequence a quarter padding",
             "- ours_vs_sdpa = SDPA time / ours (interleaved medians); rel_err against float64 SDPA",
             f"- crossover (SDPA from this key length on): {measured}"]
    write_results(torch.device("cpu"), "attention_full", "all-true layouts: kernel vs SDPA", rows,
                  notes)
    if args.write_crossover:
        write_crossover(measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
