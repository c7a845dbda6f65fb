"""Benchmark sparsekernels::bsr_linear against dense F.linear and the other baselines.

    python bench/bench_bsr_linear.py               # the matrix for this device
    python bench/bench_bsr_linear.py --smoke       # seconds; run in CI
    python bench/bench_bsr_linear.py --write-crossover   # also update ops/crossover.json
    python bench/bench_bsr_linear.py --headline    # the GPU check's points (tools/gpu_check.py)

Per case: dense F.linear, the physically resized dense layer (same kept fraction of output
rows), torch.sparse BSR, 2:4 semi-structured (GPU, density 0.5), our kernel (explicit
backend) and SparseLinear with backend=auto; the floor from the measured peak FLOP rate and
copy bandwidth (BENCH.md); efficiency = floor / time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import (kernel_bench_parser, kernel_bench_setup, read_results,  # noqa: E402
                    time_interleaved, write_results)

from sparsekernels import BlockSparseTensor, SparseLinear  # noqa: E402
from sparsekernels.ops.backend import Backend  # noqa: E402
from sparsekernels.formats.functional import sparse_linear  # noqa: E402
from sparsekernels.testing import random_block_mask  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (768, 2304), (1024, 4096), (4096, 1024), (1600, 6400)]
DENSITIES = [1.0, 0.5, 0.3, 0.1, 0.05]
TARGET_SHAPE, TARGET_TOKENS = (768, 3072), 2048
# the GPU check's points (issue 22); density 1 anchors the crossover
HEADLINE_SHAPES, HEADLINE_TOKENS = ((768, 3072), (3072, 768)), 8192
HEADLINE_DENSITIES, HEADLINE_BLOCKS = (1.0, 0.5, 0.3, 0.1), (32, 64)


@dataclasses.dataclass(frozen=True)
class Case:
    k: int
    n: int
    tokens: int
    density: float
    block: tuple[int, int]
    dtype: str
    backward: bool = False  # also time SparseLinear forward+backward vs nn.Linear


def cases(device: torch.device, smoke: bool) -> list[Case]:
    if smoke:
        return [Case(256, 512, 64, d, (32, 32), "float32", backward=d == 0.3)
                for d in (1.0, 0.3, 0.1)]
    out = []
    if device.type == "cpu":
        # 2 cores: the targets in full, the rest of the matrix thinned to fit minutes
        for d, b in itertools.product(DENSITIES, (16, 32, 64, 128)):
            out.append(Case(*TARGET_SHAPE, TARGET_TOKENS, d, (b, b), "float32", backward=b == 32))
        for (k, n), d in itertools.product(SHAPES[1:], (1.0, 0.5, 0.1)):
            out.append(Case(k, n, TARGET_TOKENS, d, (32, 32), "float32"))
        for t, d in itertools.product((1, 128), (1.0, 0.5, 0.1)):
            out.append(Case(*TARGET_SHAPE, t, d, (32, 32), "float32"))
    else:
        for dtype in ("bfloat16", "float16"):
            for (k, n), t, d, b in itertools.product(SHAPES, (1, 128, 2048, 8192), DENSITIES,
                                                     (16, 32, 64, 128)):
                out.append(Case(k, n, t, d, (b, b), dtype, backward=(t == 8192 and b in (32, 64))))
    return out


def headline_cases(device: torch.device, smoke: bool) -> list[Case]:
    """BERT-base FFN shapes at 8192 tokens in bf16, forward+backward below density 1;
    smoke: the same list at 64 tokens (seconds on a CPU)."""
    tokens = 64 if smoke else HEADLINE_TOKENS
    return [Case(k, n, tokens, d, (b, b), "bfloat16", backward=d < 1.0)
            for (k, n), b, d in itertools.product(HEADLINE_SHAPES, HEADLINE_BLOCKS,
                                                  HEADLINE_DENSITIES)]


def run_case(c: Case, device: torch.device, backend: Backend, peak: float, bw: float, reps: int) -> dict:
    dtype = getattr(torch, c.dtype)
    bm, bk = c.block
    grid = (c.n // bm, c.k // bk)
    x = torch.randn(c.tokens, c.k, device=device, dtype=dtype)
    w = torch.randn(c.n, c.k, device=device, dtype=dtype) / math.sqrt(c.k)
    mask = random_block_mask(grid, c.density).to(device)
    W = BlockSparseTensor.from_dense(w, c.block, mask=mask)
    wd = W.to_dense()
    n_resized = max(bm, round(c.density * grid[0]) * bm)
    w_resized = wd[:n_resized].contiguous()
    auto = SparseLinear.from_block_sparse(W, None, backend="auto").to(device)

    y = sparse_linear(x, W, backend=backend)  # check before timing
    ref = F.linear(x.double(), wd.double())
    err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"{c}: wrong output (rel err {err:.2e})"

    fns = {
        "dense": lambda: F.linear(x, w),
        "sparse": lambda: sparse_linear(x, W, backend=backend),
        "auto": lambda: auto(x),
        "resized": lambda: F.linear(x, w_resized),
    }
    # torch.sparse BSR: tens of times slower on CPU, so it gets one timed run past warm-up
    bsr_time = float("nan")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w_bsr = wd.to_sparse_bsr(c.block)
            bsr_time = time_interleaved({"bsr": lambda: F.linear(x, w_bsr)}, device,
                                        reps=1 if device.type == "cpu" else reps,
                                        warmup=1)["bsr"]
    except Exception:  # not supported for this dtype/device: n/a
        pass
    semi_time = float("nan")
    if device.type == "cuda" and c.density == 0.5:
        try:
            from torch.sparse import to_sparse_semi_structured

            w24 = to_sparse_semi_structured(_prune_2_4(w))
            semi_time = time_interleaved({"s": lambda: F.linear(x, w24)}, device, reps=reps)["s"]
        except Exception:
            pass
    with torch.no_grad():
        t = time_interleaved(fns, device, reps=reps)

    row = {"k": c.k, "n": c.n, "tokens": c.tokens, "block": f"{bm}x{bk}", "density": c.density,
           "dtype": c.dtype, "backend": backend.value,
           "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3, "auto_ms": t["auto"] * 1e3,
           "resized_ms": t["resized"] * 1e3, "torch_bsr_ms": bsr_time * 1e3,
           "semi24_ms": semi_time * 1e3}
    b = x.element_size()
    flops = 2 * c.tokens * c.k * c.n * c.density
    bytes_ = b * (c.tokens * c.k + c.tokens * c.n + c.density * c.k * c.n) + 4 * 3 * W.nnz_blocks
    floor = max(flops / peak, bytes_ / bw)
    row.update(speedup=t["dense"] / t["sparse"], auto_vs_dense=t["dense"] / t["auto"],
               vs_torch_bsr=bsr_time / t["sparse"], vs_resized=t["resized"] / t["sparse"],
               floor_ms=floor * 1e3, efficiency=floor / t["sparse"],
               tflops=flops / t["sparse"] / 1e12, best_possible=t["dense"] / floor)
    if c.backward:
        lin = torch.nn.Linear(c.k, c.n, bias=True, device=device, dtype=dtype)
        sl = SparseLinear.from_linear(lin, c.block, mask=mask, backend=backend)
        xg = x.clone().requires_grad_(True)
        g = torch.randn(c.tokens, c.n, device=device, dtype=dtype)
        tb = time_interleaved({"dense": lambda: lin(xg).backward(g),
                               "sparse": lambda: sl(xg).backward(g)}, device, reps=reps)
        row.update(fwdbwd_dense_ms=tb["dense"] * 1e3, fwdbwd_sparse_ms=tb["sparse"] * 1e3,
                   fwdbwd_speedup=tb["dense"] / tb["sparse"])
    return row


def _prune_2_4(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(-1, 4)
    keep = g.abs().topk(2, dim=1).indices
    out = torch.zeros_like(g).scatter_(1, keep, g.gather(1, keep))
    return out.reshape_as(w)


def crossover_from(rows: list[dict], margin: float = 1.05) -> dict[str, float]:
    """Per block size, the density above which auto should run dense: the kernel's time
    grows with the density (speedup(d) ~ speedup_i * d_i / d), so from each shape's densest
    measured point at the largest token count the crossover is speedup_i * d_i / margin;
    the smallest over shapes is kept (conservative: auto never picks a slower kernel)."""
    big = max(int(r["tokens"]) for r in rows)
    densest: dict[tuple, dict] = {}
    for r in rows:
        if int(r["tokens"]) != big:
            continue
        key = (r["block"], r["k"], r["n"])
        if key not in densest or float(r["density"]) > float(densest[key]["density"]):
            densest[key] = r
    out: dict[str, float] = {}
    for (block, _, _), r in densest.items():
        estimate = min(1.0, float(r["speedup"]) * float(r["density"]) / margin)
        out[block] = round(min(out.get(block, 1.0), estimate), 3)
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    big = max(r["tokens"] for r in rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for block in sorted({r["block"] for r in rows}, key=lambda b: int(b.split("x")[0])):
        pts = sorted((r["density"], r["speedup"]) for r in rows
                     if r["block"] == block and r["tokens"] == big and (r["k"], r["n"]) == TARGET_SHAPE)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"block {block}")
    ax.axhline(1.0, color="gray", lw=1, ls="--", label="dense F.linear")
    ax.set_xlabel("block density")
    ax.set_ylabel("speedup vs dense")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_crossover(device: torch.device, rows: list[dict], dtypes) -> None:
    path = Path(__file__).resolve().parents[1] / "sparsekernels" / "ops" / "crossover.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    for dtype in dtypes:
        measured = crossover_from([r for r in rows if r["dtype"] == dtype])
        table.setdefault(device.type, {}).setdefault(dtype, {}).update(measured)
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}: {table}")


def main(argv=None) -> int:
    p = kernel_bench_parser(__doc__)
    p.add_argument("--write-crossover", action="store_true")
    p.add_argument("--crossover-from-csv", default=None,
                   help="recompute ops/crossover.json from a results CSV (no measurement)")
    args = p.parse_args(argv)
    if args.crossover_from_csv:
        rows = read_results(args.crossover_from_csv)
        write_crossover(torch.device(args.device), rows, sorted({r["dtype"] for r in rows}))
        return 0
    device, backend, all_cases, peaks, bw = kernel_bench_setup(
        args, headline_cases if args.headline else cases, "bsr_linear")
    dtypes = sorted(peaks)
    rows = []
    for i, c in enumerate(all_cases):
        row = run_case(c, device, backend, peaks[c.dtype], bw, 3 if args.smoke else args.reps)
        rows.append(row)
        print(f"[{i + 1}/{len(all_cases)}] {c.k}->{c.n} T={c.tokens} block {row['block']} "
              f"d={c.density}: dense {row['dense_ms']:.3f} ms, sparse {row['sparse_ms']:.3f} ms "
              f"(x{row['speedup']:.2f}), auto x{row['auto_vs_dense']:.2f}, "
              f"eff {row['efficiency']:.2f}", flush=True)
    if args.smoke:
        return 0
    notes = [f"- peak FLOP/s measured: " + ", ".join(f"{d} {v / 1e12:.2f} TFLOP/s" for d, v in peaks.items()),
             f"- copy bandwidth measured: {bw / 1e9:.1f} GB/s",
             f"- kernel backend: {backend.value}; `auto` = SparseLinear(backend='auto') (dense above "
             "the crossover); `resized` = dense layer with the kept fraction of output rows",
             "- speedup = dense / sparse; efficiency = floor / sparse; best_possible = dense / floor"]
    out_dir = write_results(device, "bsr_linear", "sparsekernels::bsr_linear", rows, notes,
                            md_columns=["k", "n", "tokens", "block", "density", "dtype", "dense_ms",
                                        "sparse_ms", "speedup", "auto_vs_dense", "vs_torch_bsr",
                                        "vs_resized", "semi24_ms", "efficiency", "tflops",
                                        "fwdbwd_speedup"])
    plot(rows, out_dir / "bsr_linear.png",
         f"bsr_linear {TARGET_SHAPE[0]}->{TARGET_SHAPE[1]}, {max(r['tokens'] for r in rows)} tokens, "
         f"{out_dir.name}")
    print(f"wrote {out_dir}/bsr_linear.{{csv,md,png}}")
    if args.write_crossover:
        write_crossover(device, rows, dtypes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
