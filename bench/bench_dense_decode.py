"""A dense Linear at decode rows on the CPU: torch's F.linear against DecodeLinear's GEMV.

    python bench/bench_dense_decode.py            # SmolLM2-135M's LM head and layers, BERT-base's
    python bench/bench_dense_decode.py --smoke    # tiny shapes, seconds (CI); nothing written

Per case (layer shape, dtype, rows 1-16), timed interleaved in one process: torch = F.linear
on the nn.Linear weight; ours = sparsekernels.nn.DecodeLinear's entry (the weight streamed
once by the block-sparse dot path, csrc/cpu/dense_decode.cpp), called directly with no row
limit so every row count is measured (the router's limits, ops.router.DENSE_DECODE_ROWS,
come from this table). floor = weight bytes / copy bandwidth; eff = floor / time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import measure_bandwidth, time_interleaved, write_results  # noqa: E402

from sparsekernels.ops.dense_decode import direct_dense_linear  # noqa: E402
from sparsekernels.ops.precision import cpu_isa  # noqa: E402

LAYERS = {"smollm2 lm_head": (576, 49152), "smollm2 up": (576, 1536),
          "smollm2 down": (1536, 576), "bert-base fc1": (768, 3072)}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    entry = direct_dense_linear()
    if entry is None:
        raise SystemExit("bench_dense_decode needs the compiled extension (make build)")
    layers = {"tiny": (64, 128)} if args.smoke else LAYERS
    dtypes = [torch.float32] + ([torch.bfloat16] if "avx512_bf16" in cpu_isa() else [])
    row_counts = (1, 4) if args.smoke else (1, 2, 4, 8, 16)
    bw = measure_bandwidth(device)
    rows = []
    for layer, (k, n) in layers.items():
        for dtype in dtypes:
            w = torch.randn(n, k, dtype=dtype) / k ** 0.5
            b = torch.randn(n, dtype=dtype)
            for r in row_counts:
                x = torch.randn(r, k, dtype=dtype)
                with torch.no_grad():
                    ref = F.linear(x.double(), w.double(), b.double())
                    ours = entry(x, w, b, r)
                    err = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
                    assert err < (1e-5 if dtype == torch.float32 else 2e-2), (layer, dtype, r, err)
                    t = time_interleaved({"torch": lambda: F.linear(x, w, b),
                                          "ours": lambda: entry(x, w, b, r)},
                                         device, reps=3 if args.smoke else args.reps,
                                         budget_s=20 if args.smoke else 60)
                floor = w.numel() * w.element_size() / bw
                row = {"layer": layer, "k": k, "n": n, "dtype": str(dtype).replace("torch.", ""),
                       "rows": r, "torch_ms": t["torch"] * 1e3, "ours_ms": t["ours"] * 1e3,
                       "ours_vs_torch": t["torch"] / t["ours"], "floor_ms": floor * 1e3,
                       "eff_torch": floor / t["torch"], "eff_ours": floor / t["ours"],
                       "rel_err": err}
                rows.append(row)
                print(" ".join(f"{k_}={v:.3g}" if isinstance(v, float) else f"{k_}={v}"
                               for k_, v in row.items()), flush=True)
    if args.smoke:
        return 0
    notes = [f"- {args.threads} threads; copy bandwidth {bw / 1e9:.1f} GB/s; medians of "
             f"{args.reps} interleaved repetitions; low-precision paths: {cpu_isa()}",
             "- torch = F.linear (MKL here); ours = the decode GEMV entry "
             "(sparsekernels._C.dense_linear_inference); rel_err: ours against float64",
             "- ours_vs_torch = torch time / ours; floor = weight bytes / copy bandwidth"]
    out = write_results(device, "dense_decode", "Dense Linear at decode rows (CPU)", rows,
                        notes, list(rows[0]))
    print(f"wrote {out}/dense_decode.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
