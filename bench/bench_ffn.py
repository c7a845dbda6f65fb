"""Benchmark the fused block-sparse FFN (sparsekernels::bsr_ffn) against the unfused pair.

    python bench/bench_ffn.py             # the matrix for this device
    python bench/bench_ffn.py --smoke     # seconds; run in CI
    python bench/bench_ffn.py --headline  # the GPU check's points (tools/gpu_check.py)

An FFN is act(x @ W1.T + b1) @ W2.T + b2 with W1 [F, H], W2 [H, F] (F = 4H). Per case:
dense (F.linear, GELU, F.linear), the resized dense FFN (the kept fraction of the F
intermediate units), unfused (bsr_linear, GELU, bsr_linear: the intermediate written,
activated and read back), fused (bsr_ffn) and SparseFFN with backend=auto.

Floor (BENCH.md), for density d in b-byte elements: 4*T*H*F*d FLOPs; bytes
b*(2*T*H + 2*d*H*F) when fused (the intermediate never reaches memory) and
b*(2*T*H + 2*d*H*F + 4*T*F) unfused (written, read and written by the activation, read).
efficiency = fused floor / fused time. At low density the unfused intermediate traffic is
a large share of the unfused floor: that is what fusion removes.

Gated FFNs (decoder LLMs: SmolLM2-135M's and Llama-3.2-1B's MLP, SiLU) run the same
comparison with three weights, (silu(x @ Wg.T) * (x @ Wu.T)) @ Wd.T: dense, resized,
unfused (bsr_linear x 3, silu, mul) and fused (bsr_gated_ffn); floor 6*T*H*F*d FLOPs,
b*(2*T*H + 3*d*H*F) bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import (kernel_bench_parser, kernel_bench_setup,  # noqa: E402
                    peak_activation_bytes, time_interleaved, write_results)

from sparsekernels import BlockSparseTensor, SparseLinear  # noqa: E402
from sparsekernels.nn import SparseFFN  # noqa: E402
from sparsekernels.formats.functional import (sparse_ffn, sparse_gated_ffn,  # noqa: E402
                                              sparse_linear)
from sparsekernels.ops.backend import Backend  # noqa: E402
from sparsekernels.testing import random_block_mask  # noqa: E402

FFNS = {"bert-base": (768, 3072), "bert-large": (1024, 4096), "gpt2-xl": (1600, 6400)}
GATED_FFNS = {"smollm2-135m": (576, 1536), "llama-3.2-1b": (2048, 8192)}
DENSITIES = [1.0, 0.5, 0.3, 0.1, 0.05]


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    tokens: int
    density: float
    block: int
    dtype: str
    train: bool = False  # also time forward+backward and its peak activation memory
    gated: bool = False  # a gated MLP (GATED_FFNS): gate, up, down


def cases(device: torch.device, smoke: bool) -> list[Case]:
    if smoke:
        return ([Case("tiny", 64, d, 32, "float32", train=d == 0.3) for d in (1.0, 0.3)]
                + [Case("smollm2-135m", 64, 0.3, 32, "float32", gated=True)])
    out = []
    if device.type == "cpu":
        for d in DENSITIES:
            out.append(Case("bert-base", 2048, d, 32, "float32", train=d in (0.3, 0.1)))
        for d in (0.5, 0.1):
            out.append(Case("bert-base", 2048, d, 64, "float32"))
            out.append(Case("bert-base", 128, d, 32, "float32"))
            out.append(Case("bert-large", 2048, d, 32, "float32"))
        for model, t, d in itertools.product(GATED_FFNS, (128, 2048), (0.5, 0.3, 0.1)):
            out.append(Case(model, t, d, 32, "float32", gated=True))
    else:
        for dtype in ("bfloat16", "float16"):
            for model, t, d, b in itertools.product(FFNS, (2048, 8192), DENSITIES, (32, 64)):
                out.append(Case(model, t, d, b, dtype, train=(t == 8192 and b == 32 and
                                                              model == "bert-base")))
    return out


def headline_cases(device: torch.device, smoke: bool) -> list[Case]:
    """The GPU check's points: BERT-base at 8192 tokens in bf16, blocks 32 and 64, forward
    and forward+backward; smoke: 64 tokens (seconds on a CPU)."""
    tokens = 64 if smoke else 8192
    return [Case("bert-base", tokens, d, b, "bfloat16", train=True)
            for b in (32, 64) for d in (0.5, 0.3, 0.1)]


def _shape(model: str) -> tuple[int, int]:
    return (128, 512) if model == "tiny" else FFNS[model]


def run_case(c: Case, device: torch.device, backend: Backend, peak: float, bw: float,
             reps: int) -> dict:
    if c.gated:
        return run_gated_case(c, device, backend, peak, bw, reps)
    dtype = getattr(torch, c.dtype)
    h, f = _shape(c.model)
    b = c.block
    x = torch.randn(c.tokens, h, device=device, dtype=dtype)
    w1 = torch.randn(f, h, device=device, dtype=dtype) / math.sqrt(h)
    w2 = torch.randn(h, f, device=device, dtype=dtype) / math.sqrt(f)
    b1 = torch.randn(f, device=device, dtype=dtype) * 0.1
    b2 = torch.randn(h, device=device, dtype=dtype) * 0.1
    W1 = BlockSparseTensor.from_dense(w1, (b, b), random_block_mask((f // b, h // b), c.density).to(device))
    W2 = BlockSparseTensor.from_dense(w2, (b, b), random_block_mask((h // b, f // b), c.density).to(device))
    d1, d2 = W1.to_dense(), W2.to_dense()
    kept = max(b, round(c.density * f / b) * b)  # the resized FFN: kept intermediate units
    r1, rb1, r2 = w1[:kept].contiguous(), b1[:kept].contiguous(), w2[:, :kept].contiguous()
    auto = SparseFFN(SparseLinear.from_block_sparse(W1, b1), SparseLinear.from_block_sparse(W2, b2),
                     "gelu")

    y = sparse_ffn(x, W1, b1, W2, b2, "gelu", backend=backend)  # check before timing
    ref = F.linear(F.gelu(F.linear(x.double(), d1.double(), b1.double())), d2.double(), b2.double())
    err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"{c}: wrong output (rel err {err:.2e})"

    fns = {
        "dense": lambda: F.linear(F.gelu(F.linear(x, d1, b1)), d2, b2),
        "resized": lambda: F.linear(F.gelu(F.linear(x, r1, rb1)), r2, b2),
        "unfused": lambda: sparse_linear(F.gelu(sparse_linear(x, W1, b1, backend)), W2, b2, backend),
        "fused": lambda: sparse_ffn(x, W1, b1, W2, b2, "gelu", backend=backend),
        "auto": lambda: auto(x),
    }
    with torch.no_grad():
        t = time_interleaved(fns, device, reps=reps)
    e = x.element_size()
    flops = 4 * c.tokens * h * f * c.density
    weights = 2 * c.density * h * f * e
    floor_fused = max(flops / peak, (e * 2 * c.tokens * h + weights) / bw)
    floor_unfused = max(flops / peak, (e * (2 * c.tokens * h + 4 * c.tokens * f) + weights) / bw)
    row = {"model": c.model, "h": h, "f": f, "tokens": c.tokens, "block": f"{b}x{b}",
           "density": c.density, "dtype": c.dtype, "backend": backend.value,
           **{f"{k}_ms": v * 1e3 for k, v in t.items()},
           "fused_vs_unfused": t["unfused"] / t["fused"], "speedup": t["dense"] / t["fused"],
           "auto_vs_dense": t["dense"] / t["auto"], "vs_resized": t["resized"] / t["fused"],
           "floor_ms": floor_fused * 1e3, "efficiency": floor_fused / t["fused"],
           "unfused_floor_ms": floor_unfused * 1e3}
    if c.train:
        row.update(_train(c, device, backend, x, W1, b1, W2, b2, reps))
    return row


def run_gated_case(c: Case, device: torch.device, backend: Backend, peak: float, bw: float,
                   reps: int) -> dict:
    dtype = getattr(torch, c.dtype)
    h, f = GATED_FFNS[c.model]
    b = c.block
    x = torch.randn(c.tokens, h, device=device, dtype=dtype)
    ws = [torch.randn(f, h, device=device, dtype=dtype) / math.sqrt(h) for _ in range(2)]
    ws.append(torch.randn(h, f, device=device, dtype=dtype) / math.sqrt(f))
    grids = [(f // b, h // b), (f // b, h // b), (h // b, f // b)]
    G, U, D = (BlockSparseTensor.from_dense(w, (b, b), random_block_mask(g, c.density).to(device))
               for w, g in zip(ws, grids))
    dg, du, dd = G.to_dense(), U.to_dense(), D.to_dense()
    kept = max(b, round(c.density * f / b) * b)  # the resized MLP: kept intermediate units
    rg, ru, rd = ws[0][:kept].contiguous(), ws[1][:kept].contiguous(), ws[2][:, :kept].contiguous()

    def mlp(a, wg, wu, wd):
        return F.linear(F.silu(F.linear(a, wg)) * F.linear(a, wu), wd)

    y = sparse_gated_ffn(x, G, U, D, backend=backend)  # check before timing
    ref = mlp(x.double(), dg.double(), du.double(), dd.double())
    err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"{c}: wrong output (rel err {err:.2e})"
    fns = {
        "dense": lambda: mlp(x, dg, du, dd),
        "resized": lambda: mlp(x, rg, ru, rd),
        "unfused": lambda: sparse_linear(F.silu(sparse_linear(x, G, None, backend))
                                         * sparse_linear(x, U, None, backend), D, None, backend),
        "fused": lambda: sparse_gated_ffn(x, G, U, D, backend=backend),
    }
    with torch.no_grad():
        t = time_interleaved(fns, device, reps=reps)
    e = x.element_size()
    flops = 6 * c.tokens * h * f * c.density
    floor = max(flops / peak, e * (2 * c.tokens * h + 3 * c.density * h * f) / bw)
    return {"model": c.model + " (gated)", "h": h, "f": f, "tokens": c.tokens, "block": f"{b}x{b}",
            "density": c.density, "dtype": c.dtype, "backend": backend.value,
            **{f"{k}_ms": v * 1e3 for k, v in t.items()},
            "fused_vs_unfused": t["unfused"] / t["fused"], "speedup": t["dense"] / t["fused"],
            "vs_resized": t["resized"] / t["fused"], "floor_ms": floor * 1e3,
            "efficiency": floor / t["fused"]}


def _train(c, device, backend, x, W1, b1, W2, b2, reps) -> dict:
    """Forward+backward: dense nn.Linear pair, unfused SparseLinear pair (saves the
    intermediate), fused SparseFFN (recomputes it in the backward)."""
    fc1 = SparseLinear.from_block_sparse(W1, b1, backend=backend.value)
    fc2 = SparseLinear.from_block_sparse(W2, b2, backend=backend.value)
    fused = SparseFFN(fc1, fc2, "gelu")
    lin1, lin2 = fc1.to_linear(), fc2.to_linear()
    xg = x.clone().requires_grad_(True)
    g = torch.randn(x.shape[0], W2.shape[0], device=device, dtype=x.dtype)
    fns = {"dense": lambda: lin2(F.gelu(lin1(xg))).backward(g),
           "unfused": lambda: fc2(F.gelu(fc1(xg))).backward(g),
           "fused": lambda: fused(xg).backward(g)}
    t = time_interleaved(fns, device, reps=reps)
    out = {f"train_{k}_ms": v * 1e3 for k, v in t.items()}
    out.update(train_speedup=t["dense"] / t["fused"], train_fused_vs_unfused=t["unfused"] / t["fused"])
    for name in ("unfused", "fused"):  # activation memory of the forward, kept for backward
        forward = (lambda: fc2(F.gelu(fc1(xg)))) if name == "unfused" else (lambda: fused(xg))
        peak = peak_activation_bytes(forward, device)
        out[f"train_{name}_MB"] = float("nan") if peak is None else peak / 2 ** 20
    return out


def main(argv=None) -> int:
    args = kernel_bench_parser(__doc__).parse_args(argv)
    device, backend, all_cases, peaks, bw = kernel_bench_setup(
        args, headline_cases if args.headline else cases, "bsr_linear")
    rows = []
    for i, c in enumerate(all_cases):
        row = run_case(c, device, backend, peaks[c.dtype], bw, 3 if args.smoke else args.reps)
        rows.append(row)
        print(f"[{i + 1}/{len(all_cases)}] {c.model} T={c.tokens} block {row['block']} "
              f"d={c.density}: dense {row['dense_ms']:.2f} ms, unfused {row['unfused_ms']:.2f}, "
              f"fused {row['fused_ms']:.2f} (x{row['fused_vs_unfused']:.2f} unfused, "
              f"x{row['speedup']:.2f} dense), auto x{row.get('auto_vs_dense', float('nan')):.2f}, "
              f"eff {row['efficiency']:.2f}"
              + (f"; train x{row['train_speedup']:.2f} dense, x{row['train_fused_vs_unfused']:.2f}"
                 f" unfused" if c.train else ""), flush=True)
    if args.smoke:
        return 0
    notes = [f"- peak FLOP/s measured: " + ", ".join(f"{d} {v / 1e12:.2f} TFLOP/s" for d, v in peaks.items()),
             f"- copy bandwidth measured: {bw / 1e9:.1f} GB/s",
             f"- kernel backend: {backend.value}; dense = F.linear, GELU, F.linear; resized = the "
             "dense FFN with the kept fraction of intermediate units; unfused = bsr_linear, GELU, "
             "bsr_linear; fused = bsr_ffn; auto = SparseFFN(backend='auto')",
             "- speedup = dense / fused; fused_vs_unfused = unfused / fused; efficiency = fused "
             "floor / fused (floors in the script's docstring)",
             "- train_*: forward+backward of dense nn.Linear pair / unfused SparseLinear pair / "
             "SparseFFN (recomputes the intermediate); train_*_MB: activation memory held "
             "after the forward"]
    out_dir = write_results(device, "ffn", "sparsekernels::bsr_ffn (fused block-sparse FFN)", rows,
                            notes, md_columns=["model", "tokens", "block", "density", "dtype",
                                               "dense_ms", "resized_ms", "unfused_ms", "fused_ms",
                                               "fused_vs_unfused", "speedup", "auto_vs_dense",
                                               "vs_resized", "efficiency", "train_speedup",
                                               "train_fused_vs_unfused", "train_unfused_MB",
                                               "train_fused_MB"])
    print(f"wrote {out_dir}/ffn.{{csv,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
