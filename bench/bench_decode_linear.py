"""Decode-time (1 to 16 tokens) block-sparse Linear and gated FFN on the CPU against the
memory floor.

    python bench/bench_decode_linear.py            # the matrix, results written
    python bench/bench_decode_linear.py --smoke    # seconds; run in CI

At decode a layer is memory-bound: its floor is the bytes it must read and write (the
stored blocks, the int32 index, x and y) over the machine's bandwidth, measured as a large
copy (bytes read plus written, BENCH.md), or its FLOPs over the measured fp32 matmul peak
where those take longer (from about 8 tokens on 2 CPU cores); efficiency = floor / time. A
read-only sweep runs faster than a copy, so a kernel that only streams can pass 1.

Weights small enough to stay in the L2 / L3 are not DRAM-bound in a loop that calls one
layer again and again, while in a model the other layers' weights evict them between two
calls. So each case is timed twice:
  cold  every call starts after a read sweep over twice the L3 (from lscpu / sysfs) has
        evicted the weights, with x touched again (it is hot in a model: the previous
        layer just wrote it), as in a model's decode step;
  hot   every call follows an untimed call of the same candidate (cache-resident weights:
        what a microbenchmark that repeats one layer sees).

Candidates (fp32, 32x32 blocks, no bias):
  dense         F.linear on the dense weight (what the pruned model replaces)
  module        a SparseLinear called in inference (no gradient): the direct C++ entry on
                the blocks as it stores them, what a pruned model runs
  op            torch.ops.sparsekernels.bsr_linear(..., "cpu"): the custom op, per-call
                Python cost included, on the blocks as stored (the dot path below 12 rows)
  op_packed     torch.ops.sparsekernels.bsr_linear_packed with pre-packed W.T blocks
  kernel_packed the C++ kernel itself (sparsekernels_C::bsr_linear_cpu with the packed
                blocks): the kernel's efficiency without the custom op's Python cost
Gated FFN (SmolLM2's MLP, 576 -> 1536 gate / up, 1536 -> 576 down, SiLU):
  dense         F.linear x 3, silu, mul
  separate      bsr_linear_packed x 3, silu, mul (the intermediate written and read)
  fused         bsr_gated_ffn_packed (one C++ kernel, the intermediate in cache)
  fused_stored  bsr_gated_ffn on the blocks as stored (no packed cache)
Interleaved: within a repetition the candidates run in a fresh random order; ratios are
medians of per-repetition ratios, so a noisy neighbour slows all candidates alike.
--quantile q (default 0.5, the median) reports the q-quantile of each candidate's times and
ratios of those instead: on a machine loaded by other work (2 OpenMP threads on 2 busy
cores stall whole time slices at a barrier) a low quantile is the better estimate of the
undisturbed time; the header says which was used.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import (kernel_bench_parser, measure_bandwidth, measure_peak_flops,  # noqa: E402
                    write_results)

from sparsekernels import BlockSparseTensor, SparseLinear  # noqa: E402
from sparsekernels.formats.block_sparse import inner_tensors  # noqa: E402
from sparsekernels.ops import _ext  # noqa: E402
from sparsekernels.ops.bsr_linear import pack  # noqa: E402
from sparsekernels.testing import random_block_mask  # noqa: E402

LAYERS = {  # name: (in_features, out_features)
    "smollm2-up": (576, 1536), "smollm2-down": (1536, 576), "smollm2-kv": (576, 192),
    "llama1b-up": (2048, 8192), "llama1b-down": (8192, 2048)}
TOKENS = (1, 2, 4, 8, 16)
DENSITIES = (1.0, 0.5, 0.3, 0.1)
BLOCK = 32


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "linear" or "gated_ffn"
    layer: str
    tokens: int
    density: float
    block: int = BLOCK
    dtype: str = "float32"


def cases(smoke: bool) -> list[Case]:
    if smoke:
        return [Case("linear", "smollm2-kv", 1, 0.3), Case("linear", "smollm2-kv", 4, 1.0),
                Case("gated_ffn", "smollm2-mlp", 2, 0.3)]
    out = [Case("linear", name, t, d) for name in LAYERS for d in DENSITIES for t in TOKENS]
    out += [Case("gated_ffn", "smollm2-mlp", t, d) for d in DENSITIES for t in TOKENS]
    return out


def l3_bytes() -> int:
    """The last-level cache (sysfs, as lscpu reports it); 32 MiB if unknown."""
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KM")) * scale)
    return best or 32 << 20


class Evictor:
    """A read sweep over twice the L3: afterwards the weights come from DRAM."""

    def __init__(self, nbytes: int):
        self.buf = torch.ones(nbytes // 4)

    def __call__(self) -> None:
        self.buf.sum()


def time_decode(fns: dict, reps: int, cold: bool, evict: Evictor, touch) -> dict[str, list[float]]:
    """Seconds per call of each candidate, `reps` samples each, interleaved in a fresh random
    order per repetition (seeded)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    for fn in fns.values():  # warm up: first-call costs stay out of the numbers
        fn()
        fn()
    for _ in range(reps):
        for name in order.sample(list(fns), len(fns)):
            fn = fns[name]
            if cold:
                evict()
                touch()
            else:
                fn()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


QUANTILE = [0.5]  # set from --quantile


def stat(values: list[float]) -> float:
    if QUANTILE[0] == 0.5:
        return statistics.median(values)
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(QUANTILE[0] * len(ordered)))]


def ratio(samples: dict, num: str, den: str) -> float:
    if QUANTILE[0] == 0.5:
        return statistics.median(a / b for a, b in zip(samples[num], samples[den]))
    return stat(samples[num]) / stat(samples[den])


def sparse_weight(n_out: int, n_in: int, density: float, block: int) -> BlockSparseTensor:
    mask = random_block_mask((n_out // block, n_in // block), density)
    return BlockSparseTensor.from_dense(torch.randn(n_out, n_in) / n_in ** 0.5, block, mask)


def stored_bytes(w: BlockSparseTensor) -> int:
    """What a forward reads of the weight: the blocks, crow and col."""
    return (w.values.numel() * w.values.element_size()
            + 4 * (w.crow_indices.numel() + w.col_indices.numel()))


def linear_case(c: Case, reps: int, bw: float, peak: float, evict: Evictor) -> dict:
    n_in, n_out = LAYERS[c.layer]
    w = sparse_weight(n_out, n_in, c.density, c.block)
    wd = w.to_dense()
    packed = pack(w.values)
    x = torch.randn(c.tokens, n_in)
    op_args = inner_tensors(w)
    kernel = _ext.op("bsr_linear", "cpu")
    linear = torch.nn.Linear(n_in, n_out, bias=False)
    linear.weight.data.copy_(wd)
    module = SparseLinear.from_linear(linear, (c.block, c.block), mask=wd != 0, backend="cpu")
    module.requires_grad_(False)  # inference: the direct kernel entry, no dispatcher
    fns = {
        "dense": lambda: F.linear(x, wd),
        "module": lambda: module(x),
        "op": lambda: torch.ops.sparsekernels.bsr_linear(x, *op_args, None, "cpu"),
        "op_packed": lambda: torch.ops.sparsekernels.bsr_linear_packed(
            x, w.values, packed, w.crow_indices, w.col_indices, None),
        "kernel_packed": lambda: kernel(x, w.values, w.crow_indices, w.col_indices, None, packed),
    }
    ref = x.double() @ wd.double().T
    for name, fn in fns.items():  # check before timing
        err = (fn().double() - ref).abs().max().item()
        assert err < 1e-4 * max(1.0, ref.abs().max().item()), f"{c}: {name} is wrong ({err:.2e})"
    nbytes = stored_bytes(w) + 4 * c.tokens * (n_in + n_out)
    flops = 2 * c.tokens * w.values.numel()
    return summarize(c, fns, reps, max(nbytes / bw, flops / peak), evict, lambda: x.sum(), nbytes,
                     dense_bytes=4 * (n_in * n_out + c.tokens * (n_in + n_out)),
                     sparse=("module", "op", "op_packed", "kernel_packed"), best="kernel_packed")


def gated_case(c: Case, reps: int, bw: float, peak: float, evict: Evictor) -> dict:
    k, hidden = 576, 1536
    gate, up = (sparse_weight(hidden, k, c.density, c.block) for _ in range(2))
    down = sparse_weight(k, hidden, c.density, c.block)
    dense = [w.to_dense() for w in (gate, up, down)]
    packs = [pack(w.values) for w in (gate, up, down)]
    x = torch.randn(c.tokens, k)
    pk = [t for w, p in zip((gate, up, down), packs)
          for t in (w.values, p, w.crow_indices, w.col_indices, None)]
    lin = [(w.values, p, w.crow_indices, w.col_indices, None)
           for w, p in zip((gate, up, down), packs)]
    stored = [t for w in (gate, up, down) for t in (*inner_tensors(w), None)]
    linear_packed = torch.ops.sparsekernels.bsr_linear_packed

    def separate():
        h = F.silu(linear_packed(x, *lin[0])) * linear_packed(x, *lin[1])
        return linear_packed(h, *lin[2])

    fns = {
        "dense": lambda: F.linear(F.silu(F.linear(x, dense[0])) * F.linear(x, dense[1]), dense[2]),
        "separate": separate,
        "fused": lambda: torch.ops.sparsekernels.bsr_gated_ffn_packed(x, *pk, "silu"),
        "fused_stored": lambda: torch.ops.sparsekernels.bsr_gated_ffn(x, *stored, "silu", "cpu"),
    }
    xd = x.double()
    ref = F.linear(F.silu(xd @ dense[0].double().T) * (xd @ dense[1].double().T), dense[2].double())
    for name, fn in fns.items():
        err = (fn().double() - ref).abs().max().item()
        assert err < 1e-4 * max(1.0, ref.abs().max().item()), f"{c}: {name} is wrong ({err:.2e})"
    nbytes = sum(stored_bytes(w) for w in (gate, up, down)) + 4 * c.tokens * 2 * k
    flops = 2 * c.tokens * sum(w.values.numel() for w in (gate, up, down))
    return summarize(c, fns, reps, max(nbytes / bw, flops / peak), evict, lambda: x.sum(), nbytes,
                     dense_bytes=4 * (3 * k * hidden + 2 * c.tokens * k),
                     sparse=("separate", "fused", "fused_stored"), best="fused")


def summarize(c: Case, fns, reps, floor, evict, touch, nbytes, dense_bytes, sparse, best) -> dict:
    row = {"kind": c.kind, "layer": c.layer, "tokens": c.tokens, "density": c.density,
           "block": c.block, "MB": nbytes / 1e6, "floor_us": floor * 1e6,
           "bytes_ratio": dense_bytes / nbytes}
    with torch.no_grad():
        for mode in ("cold", "hot"):
            s = time_decode(fns, reps, mode == "cold", evict, touch)
            for name in fns:
                row[f"{mode}_{name}_us"] = stat(s[name]) * 1e6
            for name in sparse:
                row[f"{mode}_{name}_vs_dense"] = ratio(s, "dense", name)
            row[f"{mode}_eff"] = floor / stat(s[best])
            if c.kind == "gated_ffn":
                row[f"{mode}_fused_vs_separate"] = ratio(s, "separate", "fused")
    return row


def main(argv=None) -> int:
    p = kernel_bench_parser(__doc__)
    p.add_argument("--quantile", type=float, default=0.5,
                   help="report this quantile of the times (0.5: medians, see the docstring)")
    args = p.parse_args(argv)
    QUANTILE[0] = args.quantile
    if args.device != "cpu":
        print("bench_decode_linear times the CPU kernels; use --device cpu")
        return 2
    torch.set_num_threads(args.threads)
    if not _ext.has_op("bsr_gated_ffn", "cpu"):
        print("the compiled CPU extension (with bsr_gated_ffn) is missing: build it first")
        return 2
    device = torch.device("cpu")
    l3 = l3_bytes()
    evict = Evictor(2 * l3 if not args.smoke else 4 << 20)
    bw = measure_bandwidth(device)
    peak = measure_peak_flops(device, torch.float32, n=1024 if args.smoke else None)
    todo = cases(args.smoke)
    if args.limit:
        todo = todo[: args.limit]
    reps = 3 if args.smoke else args.reps
    rows = []
    for i, c in enumerate(todo):
        row = (linear_case if c.kind == "linear" else gated_case)(c, reps, bw, peak, evict)
        rows.append(row)
        sparse = "kernel_packed" if c.kind == "linear" else "fused"
        print(f"[{i + 1}/{len(todo)}] {c.layer} T={c.tokens} d={c.density}: floor "
              f"{row['floor_us']:.1f} us; cold dense {row['cold_dense_us']:.1f}, {sparse} "
              f"{row[f'cold_{sparse}_us']:.1f} (eff {row['cold_eff']:.2f}, "
              f"x{row[f'cold_{sparse}_vs_dense']:.2f} dense); hot {sparse} "
              f"{row[f'hot_{sparse}_us']:.1f} (x{row[f'hot_{sparse}_vs_dense']:.2f})", flush=True)
    if args.smoke:
        return 0
    a = torch.ones(1 << 26)
    t = min(time_decode({"sum": lambda: a.sum()}, 5, False, evict, lambda: None)["sum"])
    read_bw = a.numel() * 4 / t
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = ["?"]
    notes = [
        f"- fp32 matmul peak measured: {peak / 1e9:.0f} GFLOP/s; "
        f"copy bandwidth measured (the floor's): {bw / 1e9:.1f} GB/s; a read-only sweep: "
        f"{read_bw / 1e9:.1f} GB/s; L3 {l3 >> 20} MiB, so cold = after a {2 * l3 >> 20} MiB "
        "read sweep",
        f"- load average at the end of the run: {' '.join(load)} (a shared machine: absolute "
        "times are noisy)",
        "- statistic: " + ("medians; the *_vs_dense ratios are medians of interleaved "
                           "per-repetition ratios" if args.quantile == 0.5 else
                           f"the {args.quantile:g}-quantile of {reps} interleaved samples per "
                           "candidate (the machine was loaded; see the docstring), ratios of "
                           "those"),
        "- floor_us = max(stored blocks + int32 index + x + y bytes / copy bandwidth, FLOPs / "
        "peak); eff = floor "
        "/ kernel_packed (linear) or / fused (gated FFN); bytes_ratio = dense bytes / sparse "
        "bytes, the speedup a memory-bound kernel could reach over a dense one at the same "
        "bandwidth",
        "- op = the custom op on the blocks as stored (dot path below 12 rows, packs per call "
        "from 12 on); module = a SparseLinear in inference (the direct C++ entry); "
        "op_packed / kernel_packed = with pre-packed W.T blocks, through the "
        "custom op / the C++ kernel directly; gated: separate = bsr_linear_packed x 3 + silu + "
        "mul, fused = bsr_gated_ffn_packed, fused_stored = bsr_gated_ffn (no packed blocks)",
    ]
    cols = ["kind", "layer", "tokens", "density", "MB", "floor_us", "bytes_ratio",
            "cold_dense_us", "cold_module_us", "cold_op_us", "cold_op_packed_us",
            "cold_kernel_packed_us",
            "cold_separate_us", "cold_fused_us", "cold_fused_stored_us", "cold_eff",
            "cold_module_vs_dense", "cold_kernel_packed_vs_dense", "cold_fused_vs_dense",
            "cold_fused_vs_separate", "hot_dense_us", "hot_module_us", "hot_kernel_packed_us",
            "hot_fused_us", "hot_eff", "hot_module_vs_dense", "hot_kernel_packed_vs_dense",
            "hot_fused_vs_dense"]
    out = write_results(device, "decode_linear",
                        "Decode (1-16 tokens): block-sparse Linear and gated FFN vs the "
                        "memory floor",
                        rows, notes, md_columns=cols)
    print(f"wrote {out}/decode_linear.{{csv,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
