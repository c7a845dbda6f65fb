"""Fused block-sparse FFNs in bf16 on the CPU: the gated MLP of a decoder LLM and BERT's FFN.

    python bench/bench_ffn_bf16.py            # SmolLM2-135M's MLP and BERT-base's FFN
    python bench/bench_ffn_bf16.py --smoke    # tiny cases, seconds (CI); nothing written

Per case (FFN, rows, density of 32x32 blocks), timed interleaved in one process, all bf16:
  dense     torch F.linear on the masked dense weights (silu * up, or GELU, then down)
  unfused   the SparseLinear modules one by one (gate, up, silu, mul, down / fc1, GELU, fc2)
  fused     SparseFFN (one bsr_gated_ffn / bsr_ffn call: the intermediate stays in the
            kernel's buffers)
and `fused_fp32`: the same SparseFFN in float32 (what bf16 is for). vs_* = that time / fused.
Floor: max(2*T*d*(3 or 2)*H*F / bf16 peak, bytes / bandwidth) with bf16 weights read once.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import (measure_bandwidth, measure_peak_flops, time_interleaved,  # noqa: E402
                    write_results)

from sparsekernels import BlockSparseTensor, SparseLinear  # noqa: E402
from sparsekernels.nn import SparseFFN  # noqa: E402
from sparsekernels.ops.precision import cpu_isa  # noqa: E402
from sparsekernels.testing import random_block_mask  # noqa: E402

FFNS = {"smollm2-135m (gated)": (576, 1536, True), "bert-base": (768, 3072, False)}


@dataclasses.dataclass(frozen=True)
class Case:
    ffn: str
    tokens: int
    density: float


def cases(smoke: bool) -> list[Case]:
    if smoke:
        return [Case("tiny (gated)", 40, 0.5), Case("tiny", 3, 0.5)]
    return [Case(f, t, d) for f in FFNS for t in (1, 16, 128, 1024) for d in (0.5, 0.3)]


def layer(n: int, k: int, density: float) -> SparseLinear:
    mask = random_block_mask((n // 32, k // 32), density)
    w = BlockSparseTensor.from_dense(torch.randn(n, k) / k ** 0.5, (32, 32), mask)
    return SparseLinear.from_block_sparse(w, torch.randn(n) * 0.1).eval()


def build(case: Case):
    h, f, gated = (64, 128, "gated" in case.ffn) if case.ffn.startswith("tiny") else FFNS[case.ffn]
    fc1, fc2 = layer(f, h, case.density), layer(h, f, case.density)
    gate = layer(f, h, case.density) if gated else None
    act = "silu" if gated else "gelu"
    fp32 = SparseFFN(fc1, fc2, act, gate=gate).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    return h, f, gated, act, fp32, bf16


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
    peak = measure_peak_flops(device, torch.bfloat16, 512 if args.smoke else 2048)
    bw = measure_bandwidth(device)
    rows = []
    for case in cases(args.smoke):
        h, f, gated, act, fp32, bf16 = build(case)
        layers = [bf16.gate, bf16.fc1, bf16.fc2] if gated else [bf16.fc1, bf16.fc2]
        dense = [m.weight.to_dense() for m in layers]
        biases = [m.bias for m in layers]
        x = torch.randn(case.tokens, h)
        xb = x.bfloat16()

        def dense_fn():
            if gated:
                hid = F.silu(F.linear(xb, dense[0], biases[0])) * F.linear(xb, dense[1], biases[1])
                return F.linear(hid, dense[2], biases[2])
            return F.linear(F.gelu(F.linear(xb, dense[0], biases[0])), dense[1], biases[1])

        def unfused_fn():
            if gated:
                return bf16.fc2(F.silu(bf16.gate(xb)) * bf16.fc1(xb))
            return bf16.fc2(F.gelu(bf16.fc1(xb)))

        with torch.no_grad():
            # check before timing (BENCH.md): each bf16 candidate near float64 on its weights
            w64 = [m.weight.to_dense().double() for m in layers]
            b64 = [m.bias.double() for m in layers]
            x64 = xb.double()
            if gated:
                ref = F.linear(F.silu(F.linear(x64, w64[0], b64[0])) * F.linear(x64, w64[1], b64[1]),
                               w64[2], b64[2])
            else:
                ref = F.linear(F.gelu(F.linear(x64, w64[0], b64[0])), w64[1], b64[1])
            scale = ref.abs().max().item()
            for name, out in (("fused", bf16(xb)), ("unfused", unfused_fn()), ("dense", dense_fn())):
                err = (out.double() - ref).abs().max().item() / scale
                assert err < 0.05, f"{case} {name}: relative error {err:.3g}"
            t = time_interleaved({"dense": dense_fn, "unfused": unfused_fn,
                                  "fused": lambda: bf16(xb), "fused_fp32": lambda: fp32(x)},
                                 device, reps=3 if args.smoke else args.reps,
                                 budget_s=30 if args.smoke else 120)
        n_mats = 3 if gated else 2
        flops = 2 * case.tokens * case.density * n_mats * h * f
        bytes_ = 2 * (2 * case.tokens * h + case.density * n_mats * h * f)
        floor = max(flops / peak, bytes_ / bw)
        row = {"ffn": case.ffn, "h": h, "f": f, "tokens": case.tokens, "density": case.density,
               **{f"{k}_ms": v * 1e3 for k, v in t.items()},
               "vs_dense": t["dense"] / t["fused"], "vs_unfused": t["unfused"] / t["fused"],
               "vs_fp32": t["fused_fp32"] / t["fused"], "floor_ms": floor * 1e3,
               "efficiency": floor / t["fused"]}
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
    if args.smoke:
        return 0
    notes = [f"- bf16 paths: {cpu_isa()}; bf16 peak measured {peak / 1e9:.0f} GFLOP/s, copy "
             f"{bw / 1e9:.1f} GB/s; {args.threads} threads, medians of {args.reps} interleaved "
             "repetitions",
             "- dense = F.linear on the masked dense bf16 weights; unfused = the SparseLinear "
             "modules one by one; fused = SparseFFN (bsr_gated_ffn / bsr_ffn); fused_fp32 = "
             "the same SparseFFN in float32; vs_X = X time / fused time",
             "- gated: silu(gate(x)) * up(x) -> down (SmolLM2-135M's MLP); plain: GELU (BERT-base)"]
    out = write_results(device, "ffn_bf16", "Fused block-sparse FFNs in bf16 (CPU)", rows, notes,
                        list(rows[0]))
    print(f"wrote {out}/ffn_bf16.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
