"""Fused block-sparse FFNs with int8 weights on the CPU: the gated MLP of a decoder LLM and
BERT's FFN.

    python bench/bench_ffn_int8.py            # SmolLM2-135M's MLP and BERT-base's FFN
    python bench/bench_ffn_int8.py --smoke    # tiny cases, seconds (CI); nothing written

Per case (FFN, rows, density of 32x32 blocks), timed interleaved in one process, fp32
activations:
  dense_fp32  torch F.linear on the masked dense fp32 weights
  dynint8     torch.ao.quantization.quantize_dynamic on the masked dense layers
  unfused     the QuantizedSparseLinear modules one by one (gate, up, silu, mul, down /
              fc1, GELU, fc2), scheme auto
  fused       one bsr_gated_ffn_int8 / bsr_ffn_int8 call (scheme auto: w8a8 above
              W8_MAX_ROWS rows runs the fused kernel, w8 below runs the layers one by one)
  fused_fp32  the same FFN as a fused fp32 SparseFFN
vs_X = X time / fused time. Floor: max(int8 ops / int8 peak, int8 weight bytes / bandwidth).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from bench_ffn_bf16 import FFNS, cases, layer  # noqa: E402  (the same cases as in bf16)
from common import time_interleaved, measure_bandwidth, write_results  # noqa: E402

from sparsekernels.nn import QuantizedSparseLinear, SparseFFN  # noqa: E402
from sparsekernels.nn.quantized_sparse_linear import (  # noqa: E402
    quantized_ffn_forward, quantized_gated_ffn_forward)
from sparsekernels.ops.precision import W8_MAX_ROWS, cpu_isa, int8_scheme  # noqa: E402

def int8_peak(n: int = 2048) -> float:
    """int8 ops/s of torch._int_mm on [n, n] (bench_lowp's peak)."""
    import time

    a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    torch._int_mm(a, a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        torch._int_mm(a, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    peak = int8_peak(256 if args.smoke else 2048)
    bw = measure_bandwidth(device)
    rows = []
    for case in cases(args.smoke):
        h, f, gated = (64, 128, "gated" in case.ffn) if case.ffn.startswith("tiny") else FFNS[case.ffn]
        act = "silu" if gated else "gelu"
        fc1, fc2 = layer(f, h, case.density), layer(h, f, case.density)
        gate = layer(f, h, case.density) if gated else None
        fp32 = SparseFFN(fc1, fc2, act, gate=gate).eval()
        sparse = [gate, fc1, fc2] if gated else [fc1, fc2]
        q = [QuantizedSparseLinear.from_sparse_linear(m).eval() for m in sparse]
        dense = [nn.Linear(m.in_features, m.out_features) for m in sparse]
        for d, m in zip(dense, sparse):
            with torch.no_grad():
                d.weight.copy_(m.weight.to_dense())
                d.bias.copy_(m.bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = [torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(d)),
                                                          {nn.Linear}, dtype=torch.qint8)
                   for d in dense]
        actf = F.silu if gated else F.gelu
        x = torch.randn(case.tokens, h)

        def chain(layers):
            if gated:
                return layers[2](actf(layers[0](x)) * layers[1](x))
            return layers[1](actf(layers[0](x)))

        def fused_fn():
            if gated:
                return quantized_gated_ffn_forward(q[0], q[1], q[2], act, x)
            return quantized_ffn_forward(q[0], q[1], act, x)

        fns = {"dense_fp32": lambda: chain(dense), "dynint8": lambda: chain(dyn),
               "unfused": lambda: chain(q), "fused": fused_fn, "fused_fp32": lambda: fp32(x)}
        with torch.no_grad():
            # check before timing (BENCH.md): each candidate near float64 on the fp32 weights
            w64 = [m.weight.to_dense().double() for m in sparse]
            b64 = [m.bias.double() for m in sparse]
            x64 = x.double()
            if gated:
                ref = F.linear(F.silu(F.linear(x64, w64[0], b64[0])) * F.linear(x64, w64[1], b64[1]),
                               w64[2], b64[2])
            else:
                ref = F.linear(F.gelu(F.linear(x64, w64[0], b64[0])), w64[1], b64[1])
            errors = {}
            for name, fn in fns.items():
                errors[name] = ((fn().double() - ref).norm() / ref.norm()).item()
                assert errors[name] < 0.1, f"{case} {name}: relative error {errors[name]:.3g}"
            # the fused FFN computes what the unfused layers do, but its GELU (activation.h)
            # is within an ulp of F.gelu, not equal: where that moves a code of the quantized
            # intermediate, that row moves by a code step; most outputs agree to rounding
            unfused = chain(q)
            diff, scale = (fused_fn() - unfused).abs(), unfused.abs().max().item()
            assert diff.median() <= 1e-5 * scale and diff.max() <= 0.02 * scale, case
            t = time_interleaved(fns, device, reps=3 if args.smoke else args.reps,
                                 budget_s=30 if args.smoke else 120)
        n_mats = 3 if gated else 2
        ops = 2 * case.tokens * case.density * n_mats * h * f
        bytes_ = case.density * n_mats * h * f + 4 * 2 * case.tokens * h
        floor = max(ops / peak, bytes_ / bw)
        row = {"ffn": case.ffn, "h": h, "f": f, "tokens": case.tokens, "density": case.density,
               "scheme": int8_scheme(case.tokens),
               **{f"{k}_ms": v * 1e3 for k, v in t.items()},
               "vs_dense_fp32": t["dense_fp32"] / t["fused"], "vs_dynint8": t["dynint8"] / t["fused"],
               "vs_unfused": t["unfused"] / t["fused"], "vs_fp32": t["fused_fp32"] / t["fused"],
               "floor_ms": floor * 1e3, "efficiency": floor / t["fused"],
               "fused_rel_err": errors["fused"], "dynint8_rel_err": errors["dynint8"]}
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
    if args.smoke:
        return 0
    notes = [f"- int8 paths: {cpu_isa()}; int8 peak measured {peak / 1e9:.0f} GOP/s "
             f"(torch._int_mm), copy {bw / 1e9:.1f} GB/s; {args.threads} threads, medians of "
             f"{args.reps} interleaved repetitions; scheme auto: w8 up to {W8_MAX_ROWS} rows",
             "- dense_fp32 = F.linear on the masked dense weights; dynint8 = quantize_dynamic of "
             "those layers; unfused = the QuantizedSparseLinear modules one by one; fused = one "
             "bsr_gated_ffn_int8 / bsr_ffn_int8 call; fused_fp32 = the same FFN as an fp32 "
             "SparseFFN; vs_X = X time / fused time; rel_err = |y - y64| / |y64| (float64 on "
             "the unquantized weights)",
             "- gated: silu(gate(x)) * up(x) -> down (SmolLM2-135M's MLP); plain: GELU (BERT-base)"]
    out = write_results(device, "ffn_int8", "Fused block-sparse FFNs with int8 weights (CPU)",
                        rows, notes, list(rows[0]))
    print(f"wrote {out}/ffn_int8.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
