"""What one SparseLinear call costs beyond its kernel: tiny layers, side by side with nn.Linear.

    python bench/bench_call_overhead.py            # the table (CPU)
    python bench/bench_call_overhead.py --smoke    # seconds; run in CI

At decode a 30-layer model makes over 200 Linear calls per token, and a tiny layer's time is
almost all Python and dispatch: this bench measures that part. Per case, interleaved in one
run (each candidate is the mean of --calls calls; medians over --reps rounds): nn.Linear;
SparseLinear routed to the sparse kernel; SparseLinear routed dense (the crossover set to 0
when it is built); the sparse op called directly (no module); each also under torch.compile
(inductor) where --compile is given. ratio = time / nn.Linear's time in the same mode.
Uses only the public API, so the same script times an older checkout for a before / after
comparison (run it there too; a row's `code` column says which).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import write_results  # noqa: E402

from sparsekernels import SparseLinear  # noqa: E402


@dataclass(frozen=True)
class Case:
    features: int
    tokens: int
    block: int = 32
    density: float = 0.5


def _mean_call_s(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def time_calls(fns: dict, calls: int, reps: int) -> dict[str, float]:
    """Median over `reps` interleaved rounds of each candidate's mean call time (seconds)."""
    for fn in fns.values():  # warm up (compilation, first-call routing)
        for _ in range(max(10, calls // 10)):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_mean_call_s(fn, calls))
    return {name: statistics.median(v) for name, v in samples.items()}


def build(case: Case, dense_route: bool) -> SparseLinear:
    linear = torch.nn.Linear(case.features, case.features)
    saved = os.environ.get("SPARSEKERNELS_DENSE_CROSSOVER")
    os.environ["SPARSEKERNELS_DENSE_CROSSOVER"] = "0.0" if dense_route else "1.0"
    try:
        layer = SparseLinear.from_linear(linear, (case.block, case.block),
                                         sparsity=1.0 - case.density).eval()
        x = torch.randn(case.tokens, case.features)
        with torch.no_grad():
            layer(x)  # older code decides its route on the first call
    finally:
        if saved is None:
            os.environ.pop("SPARSEKERNELS_DENSE_CROSSOVER")
        else:
            os.environ["SPARSEKERNELS_DENSE_CROSSOVER"] = saved
    return layer


def candidates(case: Case, compile_: bool) -> dict:
    linear = torch.nn.Linear(case.features, case.features).eval()
    sparse, dense = build(case, False), build(case, True)
    x = torch.randn(case.tokens, case.features)
    op_args = (x, *sparse.op_args(), sparse.bias, "cpu")
    fns = {"nn.Linear": lambda: linear(x), "SparseLinear (sparse route)": lambda: sparse(x),
           "SparseLinear (dense route)": lambda: dense(x),
           "bsr_linear op": lambda: torch.ops.sparsekernels.bsr_linear(*op_args)}
    if compile_:
        c_lin, c_sparse = torch.compile(linear), torch.compile(sparse)
        c_dense = torch.compile(dense)
        fns.update({"compiled nn.Linear": lambda: c_lin(x),
                    "compiled SparseLinear (sparse)": lambda: c_sparse(x),
                    "compiled SparseLinear (dense)": lambda: c_dense(x)})
    with torch.no_grad():
        want = x @ sparse.weight.to_dense().T + sparse.bias
        for name, fn in fns.items():
            if "SparseLinear (sparse" in name or name == "bsr_linear op":
                torch.testing.assert_close(fn(), want, rtol=1e-5, atol=1e-5)
    return fns


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        return "?"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd modules")
    p.add_argument("--name", default="call_overhead", help="results file name")
    p.add_argument("--smoke", action="store_true", help="tiny run; nothing written")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [Case(64, 1)] if args.smoke else [Case(64, 1), Case(64, 8), Case(256, 1)]
    reps, calls = (2, 50) if args.smoke else (args.reps, args.calls)
    code = git_revision()
    rows = []
    with torch.no_grad():
        for case in cases:
            times = time_calls(candidates(case, args.compile), calls, reps)
            for mode in ("eager", "compiled"):
                base_name = "nn.Linear" if mode == "eager" else "compiled nn.Linear"
                if base_name not in times:
                    continue
                for name, t in times.items():
                    if name.startswith("compiled") != (mode == "compiled"):
                        continue
                    rows.append({"code": code, "features": case.features, "tokens": case.tokens,
                                 "density": case.density, "mode": mode, "candidate": name,
                                 "us_per_call": t * 1e6, "vs_linear": t / times[base_name]})
                    print(f"{case.features}x{case.features} T={case.tokens} {name}: "
                          f"{t * 1e6:.1f} us (x{t / times[base_name]:.2f} nn.Linear)", flush=True)
    if args.smoke:
        return 0
    notes = ["- fp32, eval + no_grad, one layer features x features at block 32 and density 0.5",
             f"- mean of {calls} calls per round, median of {reps} interleaved rounds",
             "- dense route: SPARSEKERNELS_DENSE_CROSSOVER=0 when the layer is built (and on "
             "its first call), so auto runs F.linear on the densified blocks",
             f"- code: git {code} of this repository"]
    out = write_results(torch.device("cpu"), args.name, "SparseLinear call overhead (tiny layers)",
                        rows, notes, ["code", "features", "tokens", "density", "mode",
                                      "candidate", "us_per_call", "vs_linear"])
    print(f"wrote {out}/{args.name}.{{csv,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
