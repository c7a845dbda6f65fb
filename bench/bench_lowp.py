"""Block-sparse Linear in fp32, bf16 and int8 on the CPU, against the floor of each dtype.

    python bench/bench_lowp.py            # BERT-base FFN shapes, 8x128 tokens and decode
    python bench/bench_lowp.py --smoke    # tiny cases, seconds (CI); nothing written

Per case (shape, tokens, density of 32x32 blocks), timed interleaved in one process:
  dense_fp32 / dense_bf16       torch F.linear on the masked dense weight
  dense_dynint8                 torch.ao.quantization.quantize_dynamic on the same Linear
  sparse_fp32 / sparse_bf16     SparseLinear (bf16: the AVX-512 BF16 kernel where present)
  sparse_int8                   QuantizedSparseLinear, scheme auto (w8 <= 16 tokens, else w8a8)
ONNX Runtime / OpenVINO are timed on whole models (bench_lowp_models.py), not per op.

Floors (BENCH.md), measured in this process: peak = a 2048^3 dense matmul in the dtype
(fp32, bf16; int8: torch._int_mm), bandwidth = a 64 MiB copy (read + write). For a sparse
op with density d in a dtype of b bytes (int8: 1-byte weights, activations as given):
  floor = max(2*T*K*N*d / peak_dtype, (act_bytes*(T*K + T*N) + wb*d*K*N) / bandwidth)
efficiency = floor / time. vs_* columns are ratios of medians (higher = ours faster).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import (  # noqa: E402
    measure_bandwidth,
    measure_peak_flops,
    time_interleaved,
    write_results,
)

from sparsekernels import QuantizedSparseLinear, SparseLinear  # noqa: E402
from sparsekernels.ops.precision import cpu_isa, int8_scheme  # noqa: E402
from sparsekernels.testing import random_block_mask  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    k: int
    n: int
    tokens: int
    density: float
    block: int = 32


def cases(smoke: bool) -> list[Case]:
    if smoke:
        return [Case(128, 256, 64, 0.5), Case(128, 256, 4, 0.3)]
    out = []
    for k, n in ((768, 3072), (3072, 768)):
        for tokens in (1024, 8, 1):
            for d in (1.0, 0.5, 0.3, 0.1):
                out.append(Case(k, n, tokens, d))
    return out


def peak_int8(n: int) -> float:
    """int8 ops/s of a large dense int8 matmul (torch._int_mm: oneDNN / VNNI)."""
    a = torch.randint(-127, 127, (n, n), dtype=torch.int8)
    b = torch.randint(-127, 127, (n, n), dtype=torch.int8)
    t = time_interleaved({"mm": lambda: torch._int_mm(a, b)}, torch.device("cpu"), reps=5)["mm"]
    return 2 * n ** 3 / t


def build(case: Case):
    torch.manual_seed(0)
    linear = nn.Linear(case.k, case.n).eval()
    grid = (case.n // case.block, case.k // case.block)
    mask = random_block_mask(grid, case.density)
    sparse = SparseLinear.from_linear(linear, (case.block, case.block), mask=mask).eval()
    with torch.no_grad():
        linear.weight.copy_(sparse.weight.to_dense())  # the masked dense layer
    sparse_bf16 = SparseLinear.from_linear(linear, (case.block, case.block), mask=mask).eval()
    sparse_bf16.to(torch.bfloat16)
    quantized = QuantizedSparseLinear.from_sparse_linear(sparse)
    dense_bf16 = nn.Linear(case.k, case.n).eval().to(torch.bfloat16)
    dense_bf16.load_state_dict({k: v.bfloat16() for k, v in linear.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynint8 = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear},
                                                         dtype=torch.qint8)
    return linear, dense_bf16, dynint8, sparse, sparse_bf16, quantized


def floor_s(case: Case, flops_peak: float, bw: float, act_bytes: int, w_bytes: float) -> float:
    d = case.density
    flops = 2 * case.tokens * case.k * case.n * d
    moved = act_bytes * case.tokens * (case.k + case.n) + w_bytes * d * case.k * case.n
    return max(flops / flops_peak, moved / bw)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    n_peak = 512 if args.smoke else 2048
    peaks = {"fp32": measure_peak_flops(device, torch.float32, n_peak),
             "bf16": measure_peak_flops(device, torch.bfloat16, n_peak),
             "int8": peak_int8(n_peak)}
    bw = measure_bandwidth(device)
    print(f"peaks: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f}, int8 "
          f"{peaks['int8'] / 1e9:.0f} GOP/s; copy {bw / 1e9:.1f} GB/s; isa {cpu_isa()}")
    rows = []
    for case in cases(args.smoke):
        linear, dense_bf16, dynint8, sparse, sparse_bf16, quantized = build(case)
        x = torch.randn(case.tokens, case.k)
        xb = x.bfloat16()
        with torch.no_grad():
            # check before timing (BENCH.md): every candidate near the masked dense layer
            y = linear(x)
            scale = y.abs().max().item()
            for name, out in (("sparse_fp32", sparse(x)), ("sparse_bf16", sparse_bf16(xb)),
                              ("sparse_int8", quantized(x)), ("dense_dynint8", dynint8(x))):
                err = (out.float() - y).abs().max().item() / scale
                assert err < (1e-4 if name == "sparse_fp32" else 0.1), f"{case} {name}: {err}"
            fns = {"dense_fp32": lambda: linear(x), "dense_bf16": lambda: dense_bf16(xb),
                   "dense_dynint8": lambda: dynint8(x), "sparse_fp32": lambda: sparse(x),
                   "sparse_bf16": lambda: sparse_bf16(xb), "sparse_int8": lambda: quantized(x)}
            t = time_interleaved(fns, device, reps=3 if args.smoke else args.reps)
        row = {"k": case.k, "n": case.n, "tokens": case.tokens, "density": case.density,
               "block": f"{case.block}x{case.block}", "int8_scheme": int8_scheme(case.tokens)}
        for name, sec in t.items():
            row[f"{name}_ms"] = sec * 1e3
        row["sparse_fp32_vs_dense"] = t["dense_fp32"] / t["sparse_fp32"]
        row["sparse_bf16_vs_dense_bf16"] = t["dense_bf16"] / t["sparse_bf16"]
        row["sparse_bf16_vs_sparse_fp32"] = t["sparse_fp32"] / t["sparse_bf16"]
        row["sparse_int8_vs_dense_fp32"] = t["dense_fp32"] / t["sparse_int8"]
        row["sparse_int8_vs_dynint8"] = t["dense_dynint8"] / t["sparse_int8"]
        row["sparse_int8_vs_sparse_fp32"] = t["sparse_fp32"] / t["sparse_int8"]
        # efficiency against each dtype's floor; w8 is weight-only (fp32 arithmetic)
        w8 = int8_scheme(case.tokens) == "w8"
        row["eff_fp32"] = floor_s(case, peaks["fp32"], bw, 4, 4) / t["sparse_fp32"]
        row["eff_bf16"] = floor_s(case, peaks["bf16"], bw, 2, 2) / t["sparse_bf16"]
        row["eff_int8"] = floor_s(case, peaks["fp32" if w8 else "int8"], bw, 4, 1) / t["sparse_int8"]
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()))
    if args.smoke:
        return 0
    notes = [f"- peaks measured in this run: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
             f"{peaks['bf16'] / 1e9:.0f} GFLOP/s, int8 {peaks['int8'] / 1e9:.0f} GOP/s "
             f"(torch._int_mm); copy bandwidth {bw / 1e9:.1f} GB/s; low-precision paths: "
             f"{cpu_isa()}",
             "- dense_* = torch on the masked dense weight (fp32, bf16, quantize_dynamic int8); "
             "sparse_* = ours (SparseLinear fp32 / bf16, QuantizedSparseLinear auto scheme)",
             "- eff_* = floor / time with the floor of that dtype (int8 w8 rows: fp32 arithmetic "
             "peak, int8 weight bytes); ratios are medians of interleaved repetitions"] + \
            [f"- {n}" for n in args.note]
    cols = ["k", "n", "tokens", "density", "int8_scheme", "dense_fp32_ms", "dense_bf16_ms",
            "dense_dynint8_ms", "sparse_fp32_ms", "sparse_bf16_ms", "sparse_int8_ms",
            "sparse_bf16_vs_sparse_fp32", "sparse_int8_vs_dense_fp32", "sparse_int8_vs_dynint8",
            "sparse_int8_vs_sparse_fp32", "eff_fp32", "eff_bf16", "eff_int8"]
    out = write_results(device, "lowp", "Block-sparse Linear in fp32, bf16 and int8 (CPU)",
                        rows, notes, cols)
    print(f"wrote {out}/lowp.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
