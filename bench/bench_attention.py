"""Benchmark sparsekernels::block_sparse_attention against dense SDPA and the other baselines.

    python bench/bench_attention.py            # the matrix for this device
    python bench/bench_attention.py --decode   # decode against a KV cache (attention_decode.*)
    python bench/bench_attention.py --smoke    # seconds; run in CI (both)
    python bench/bench_attention.py --headline # the GPU check's points (tools/gpu_check.py)

Per case (12 heads, head dim 64, blocks 64x64; on GPU batch x L = 16k tokens in bf16, on CPU
batch 1 in fp32): dense F.scaled_dot_product_attention (flash on GPU), FlexAttention with the
same block mask (compiled), torch.sparse BSR SDPA (GPU, where it runs), and our op with each
backend that runs here; forward, and forward+backward where the case says so. Every candidate's
output is checked against the float64 reference (first head, first query rows) before timing.
Columns: times, speedups (dense / ours, flex / ours), effective TFLOP/s on the computed blocks,
and efficiency = floor / time with the floor from the measured peak FLOP rate and copy
bandwidth (BENCH.md).

Decode (--decode): SmolLM2-135M's attention shape (9 query heads on 3 key/value heads, head
dim 64), 1, 4 or 16 new queries at the end of a cache of 128, 512 or 2048 keys, causal, a dense
layout and a 50% one (half the key blocks of each head; the newest always kept), fp32 and
bf16. Baselines: transformers' own SDPA attention function (what a model runs: one query
packs the group, more queries repeat the key/value heads), plain SDPA on repeated key/value
heads, and SDPA with enable_gqa. Decode is memory-bound: the floor is the bytes of the cache
blocks the call reads (the stored key blocks of any head of a group) over the copy bandwidth;
each call reads a different cache of a rotation larger than the last-level cache, as the
layers of a model do. The per-call cost (one key block) is reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import (measure_bandwidth, measure_peak_flops, time_interleaved,  # noqa: E402
                    write_results)

from sparsekernels.attention import layouts as L  # noqa: E402
from sparsekernels.ops.backend import Backend, available  # noqa: E402
from sparsekernels.ops.block_sparse_attention import block_sparse_attention  # noqa: E402
from sparsekernels.ops.reference import block_sparse_attention as ref  # noqa: E402

OP = "block_sparse_attention"
SEQ_LENS = (512, 1024, 2048, 4096, 8192)
TOKENS = 16384
DENSITIES = (0.05, 0.1, 0.25, 0.5, 1.0)
WINDOWS = (256, 512)


@dataclasses.dataclass(frozen=True)
class Case:
    seq_len: int
    batch: int
    layout: str  # "random", "window", "causal"
    density: float = 1.0  # random layouts: fraction of blocks
    window: int = 0  # sliding window half-width
    heads: int = 12
    head_dim: int = 64
    block: tuple[int, int] = (64, 64)
    dtype: str = "float32"
    backward: bool = False

    @property
    def name(self) -> str:
        kind = {"random": f"random d={self.density}", "window": f"window {self.window}",
                "causal": "causal"}[self.layout]
        return f"L={self.seq_len} b={self.batch} {kind}"


def cases(device: torch.device, smoke: bool) -> list[Case]:
    if smoke:
        return [Case(256, 1, "random", 0.25, heads=2, backward=True),
                Case(256, 1, "causal", heads=2), Case(256, 1, "window", window=64, heads=2)]
    out = []
    if device.type == "cpu":  # fp32, batch 1: the dense baseline is O(L^2) on 2 cores
        for n in (512, 1024, 2048, 4096):
            for d in DENSITIES:
                out.append(Case(n, 1, "random", d, backward=n == 2048 and d in (0.1, 0.25)))
            for w in WINDOWS:
                out.append(Case(n, 1, "window", window=w))
            out.append(Case(n, 1, "causal", backward=n == 2048))
    else:
        for n in SEQ_LENS:
            b = max(1, TOKENS // n)
            for d in DENSITIES:
                out.append(Case(n, b, "random", d, dtype="bfloat16", backward=d in (0.1, 0.25)))
            for w in WINDOWS:
                out.append(Case(n, b, "window", window=w, dtype="bfloat16", backward=True))
            out.append(Case(n, b, "causal", dtype="bfloat16", backward=True))
    return out


def headline_cases(device: torch.device, smoke: bool) -> list[Case]:
    """The GPU check's points: L = 4096 in bf16 at block density 0.25 and 1, forward and
    forward+backward; smoke: L = 256, 2 heads (seconds on a CPU)."""
    if smoke:
        return [Case(256, 1, "random", d, heads=2, dtype="bfloat16", backward=True)
                for d in (0.25, 1.0)]
    return [Case(4096, TOKENS // 4096, "random", d, dtype="bfloat16", backward=True)
            for d in (0.25, 1.0)]


def make_layout(c: Case, generator: torch.Generator) -> torch.Tensor:
    if c.layout == "random":
        return L.random_layout(c.heads, c.seq_len, c.seq_len, c.block, c.density, generator)
    if c.layout == "window":
        return L.sliding_window_layout(c.heads, c.seq_len, c.window, c.block)
    return L.causal_layout(c.heads, c.seq_len, c.block)


def computed_pairs(c: Case, layout: torch.Tensor) -> int:
    """Element (query, key) pairs the kernel computes: stored blocks x block area x batch."""
    return int(layout.sum()) * c.block[0] * c.block[1] * c.batch


# --- baselines ------------------------------------------------------------------------------
def flex_runner(c: Case, layout: torch.Tensor, q, k, v):
    """FlexAttention with the same block mask, compiled; None when it cannot run here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    bq, bk = c.block
    lay = layout.to(q.device)
    causal = c.layout == "causal"

    def mask_mod(b, h, qi, kj):
        keep = lay[h, qi // bq, kj // bk]
        return keep & (qi >= kj) if causal else keep

    try:
        bm = create_block_mask(mask_mod, None, c.heads, c.seq_len, c.seq_len, device=q.device,
                               BLOCK_SIZE=(bq, bk))
        # a fresh compile per case: past dynamo's recompile limit flex silently runs unfused
        torch._dynamo.reset()
        fn = torch.compile(flex_attention, dynamic=False)
        fn(q, k, v, block_mask=bm)  # compile outside the timing
        return lambda: fn(q, k, v, block_mask=bm)
    except Exception as exc:  # report n/a, keep benchmarking
        warnings.warn(f"FlexAttention unavailable for {c.name}: {type(exc).__name__}: {exc}")
        return None


def bsr_sdpa_runner(c: Case, layout: torch.Tensor, q, k, v):
    """torch.sparse BSR SDPA (a Triton kernel inside torch, CUDA only); None where it does not
    run. The BSR mask has one [L, L] matrix per (batch, head)."""
    if q.device.type != "cuda" or c.layout == "causal":
        return None
    try:
        from torch.sparse._triton_ops import _scaled_dot_product_attention as bsr_sdpa
    except ImportError:
        return None
    try:
        bq, bk = c.block
        dense = layout.repeat_interleave(bq, 1).repeat_interleave(bk, 2).to(q.device, q.dtype)
        dense = dense.unsqueeze(0).expand(c.batch, -1, -1, -1).reshape(-1, c.seq_len, c.seq_len)
        mask = dense.to_sparse_bsr((bq, bk))
        q3, k3, v3 = (t.reshape(-1, c.seq_len, c.head_dim) for t in (q, k, v))
        bsr_sdpa(q3, k3, v3, attn_mask=mask)
        return lambda: bsr_sdpa(q3, k3, v3, attn_mask=mask)
    except Exception as exc:
        warnings.warn(f"torch.sparse BSR SDPA unavailable for {c.name}: {type(exc).__name__}")
        return None


def our_backends(device: torch.device) -> list[str]:
    order = ["cpu"] if device.type == "cpu" else ["triton", "cuda"]
    return [b for b in order if available(Backend(b), device, OP) is None]


# --- correctness gate -----------------------------------------------------------------------
def check_output(c: Case, out: torch.Tensor, q, k, v, layout, name: str) -> float:
    """Max abs error on the first head and the first (up to) 512 queries vs float64."""
    n = min(512, c.seq_len)
    nq = -(-n // c.block[0])
    args = [t[:1, :1].double() for t in (q, k, v)]
    args[0] = args[0][:, :, :n]
    want, _ = ref.block_sparse_attention(*args, layout[:1, :nq], c.block, None,
                                         c.layout == "causal", c.head_dim ** -0.5)
    got = out[:1, :1, :n].double()
    err = (got - want).abs().max().item()
    tol = 2e-2 if c.dtype != "float32" else 1e-4
    if not err <= tol * max(1.0, want.abs().max().item()):
        raise AssertionError(f"{name} on {c.name}: max abs error {err:.3e} vs float64")
    return err


def run_case(c: Case, device: torch.device, peak: float, bw: float, reps: int,
             flex: bool) -> list[dict]:
    dtype = getattr(torch, c.dtype)
    g = torch.Generator().manual_seed(c.seq_len)
    layout = make_layout(c, g).to(device)
    shape = (c.batch, c.heads, c.seq_len, c.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    causal = c.layout == "causal"
    fns = {"dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    ours = our_backends(device)
    for b in ours:
        fns[f"ours_{b}"] = (lambda b=b: block_sparse_attention(q, k, v, layout, c.block,
                                                               causal=causal, backend=b))
        check_output(c, fns[f"ours_{b}"](), q, k, v, layout, b)
    flex_fn = flex_runner(c, layout, q, k, v) if flex else None
    if flex_fn is not None:
        check_output(c, flex_fn(), q, k, v, layout, "flex")
        fns["flex"] = flex_fn
    bsr_fn = bsr_sdpa_runner(c, layout, q, k, v)
    if bsr_fn is not None:
        fns["torch_bsr_sdpa"] = bsr_fn
    times = time_interleaved(fns, device, reps=reps)

    pairs = computed_pairs(c, layout)
    flops = 4 * pairs * c.head_dim  # QK^T and PV
    nbytes = torch.finfo(dtype).bits // 8 * 4 * q.numel()  # read q, k, v; write out
    floor = max(flops / peak, nbytes / bw)
    best = min(times[f"ours_{b}"] for b in ours) if ours else float("nan")
    row = {
        "case": c.name, "seq_len": c.seq_len, "batch": c.batch, "layout": c.layout,
        "block_density": round(L.density(layout), 4), "dtype": c.dtype, "pass": "fwd",
        "dense_sdpa_ms": times["dense_sdpa"] * 1e3,
        "flex_ms": times.get("flex", float("nan")) * 1e3,
        "torch_bsr_sdpa_ms": times.get("torch_bsr_sdpa", float("nan")) * 1e3,
    }
    for b in ("cpu", "triton", "cuda"):
        row[f"ours_{b}_ms"] = times.get(f"ours_{b}", float("nan")) * 1e3
    row.update({
        "speedup_vs_dense": times["dense_sdpa"] / best,
        "speedup_vs_flex": times.get("flex", float("nan")) / best,
        "tflops_ours": flops / best / 1e12,
        "efficiency_ours": floor / best,
    })
    rows = [row]
    if c.backward:
        rows.append(run_backward(c, q, k, v, layout, causal, ours, flex_fn is not None, device,
                                 reps, row))
    return rows


def run_backward(c: Case, q, k, v, layout, causal, ours, with_flex, device, reps, fwd_row):
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)

    def step(fn):
        def run():
            out = fn()
            torch.autograd.grad(out, (qg, kg, vg), grad)
        return run

    fns = {"dense_sdpa": step(lambda: F.scaled_dot_product_attention(qg, kg, vg,
                                                                     is_causal=causal))}
    for b in ours:
        fns[f"ours_{b}"] = step(lambda b=b: block_sparse_attention(qg, kg, vg, layout, c.block,
                                                                   causal=causal, backend=b))
    if with_flex:
        flex_fn = flex_runner(c, layout, qg, kg, vg)
        if flex_fn is not None:
            fns["flex"] = step(flex_fn)
    times = time_interleaved(fns, device, reps=max(3, reps // 2))
    best = min(times[f"ours_{b}"] for b in ours) if ours else float("nan")
    row = dict(fwd_row)
    row["pass"] = "fwd+bwd"
    row["dense_sdpa_ms"] = times["dense_sdpa"] * 1e3
    row["flex_ms"] = times.get("flex", float("nan")) * 1e3
    row["torch_bsr_sdpa_ms"] = float("nan")
    for b in ("cpu", "triton", "cuda"):
        row[f"ours_{b}_ms"] = times.get(f"ours_{b}", float("nan")) * 1e3
    pairs = computed_pairs(c, layout)
    flops = 10 * pairs * c.head_dim  # forward 4, backward 6 (dV, dP, dK, dQ and the recompute)
    row.update({"speedup_vs_dense": times["dense_sdpa"] / best,
                "speedup_vs_flex": times.get("flex", float("nan")) / best,
                "tflops_ours": flops / best / 1e12, "efficiency_ours": float("nan")})
    return row


# --- decode against a KV cache ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecodeCase:
    lq: int  # new queries, the last lq positions of the cache
    lk: int  # keys in the cache, the new ones included
    density: float  # fraction of key blocks each head stores (1: dense)
    dtype: str = "float32"
    heads: int = 9  # SmolLM2-135M
    kv_heads: int = 3
    head_dim: int = 64
    block: tuple[int, int] = (16, 64)

    @property
    def name(self) -> str:
        return f"q={self.lq} k={self.lk} d={self.density} {self.dtype}"


def decode_cases(smoke: bool) -> list[DecodeCase]:
    if smoke:
        return [DecodeCase(1, 128, 1.0), DecodeCase(4, 256, 0.5, "bfloat16")]
    return [DecodeCase(lq, lk, d, dt) for dt in ("float32", "bfloat16") for d in (1.0, 0.5)
            for lk in (128, 512, 2048) for lq in (1, 4, 16)]


LAST_LEVEL_CACHE = 32 << 20  # bytes (AMD EPYC here); rotating 3x this keeps caches in memory


def decode_layout(c: DecodeCase, generator: torch.Generator) -> torch.Tensor:
    nk = -(-c.lk // c.block[1])
    keep = torch.rand(c.heads, 1, nk, generator=generator) < c.density
    if c.density < 1.0:  # exactly half per head, the newest block always kept
        order = torch.rand(c.heads, nk, generator=generator).argsort(-1)
        keep = torch.zeros(c.heads, nk, dtype=torch.bool)
        keep.scatter_(-1, order[:, :max(1, round(c.density * nk))], True)
        keep = keep.unsqueeze(1)
    else:
        keep[:] = True
    keep[..., -1] = True
    return keep


def _transformers_sdpa():
    """transformers' SDPA attention function (what its models run), or None."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return None
    return sdpa_attention_forward


class _Module(torch.nn.Module):
    """What transformers' attention functions read from an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def run_decode_case(c: DecodeCase, bw: float, reps: int) -> dict:
    dtype = getattr(torch, c.dtype)
    g = torch.Generator().manual_seed(c.lq * 10000 + c.lk)
    layout = decode_layout(c, g)
    groups = c.heads // c.kv_heads
    cache_bytes = 2 * c.kv_heads * c.lk * c.head_dim * dtype.itemsize
    n_sets = max(2, -(-3 * LAST_LEVEL_CACHE // cache_bytes))
    sets = [(torch.randn(1, c.heads, c.lq, c.head_dim, dtype=dtype),
             torch.randn(1, c.kv_heads, c.lk, c.head_dim, dtype=dtype),
             torch.randn(1, c.kv_heads, c.lk, c.head_dim, dtype=dtype)) for _ in range(n_sets)]
    # transformers' causal mask for new queries at the end of the cache (None for one query)
    mask = None if c.lq == 1 else ref.position_mask(c.lq, c.lk, True)[None, None]
    scale = c.head_dim ** -0.5

    def rotating(fn):
        state = {"i": 0}

        def run():
            state["i"] = (state["i"] + 1) % n_sets
            return fn(*sets[state["i"]])
        return run

    def ours(q, k, v):
        return block_sparse_attention(q, k, v, layout, c.block, causal=True, backend="cpu")

    def repeat_kv(x):
        return x.repeat_interleave(groups, dim=1)

    fns = {"ours": rotating(ours),
           "sdpa_repeat_kv": rotating(lambda q, k, v: F.scaled_dot_product_attention(
               q, repeat_kv(k), repeat_kv(v), attn_mask=mask, scale=scale)),
           "sdpa_gqa": rotating(lambda q, k, v: F.scaled_dot_product_attention(
               q, k, v, attn_mask=mask, scale=scale, enable_gqa=True))}
    hf = _transformers_sdpa()
    module = _Module(groups)
    if hf is not None:
        fns["transformers_sdpa"] = rotating(lambda q, k, v: hf(module, q, k, v, mask,
                                                               scaling=scale)[0])
    # correctness gate: ours against the float64 reference, the dense baselines against SDPA
    q, k, v = sets[0]
    want, _ = ref.block_sparse_attention(q.double(), k.double(), v.double(), layout, c.block,
                                         None, True, scale)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    err = (ours(q, k, v).double() - want).abs().max().item()
    if not err <= tol * max(1.0, want.abs().max().item()):
        raise AssertionError(f"ours on {c.name}: max abs error {err:.3e} vs float64")
    times = time_interleaved(fns, torch.device("cpu"), reps=reps, warmup=3)
    # the bytes ours reads: the key blocks any query head of a group stores, K and V
    nk = layout.shape[-1]
    read = layout.view(c.kv_heads, groups, nk).any(1)
    kv_rows = sum(min(c.block[1], c.lk - kb * c.block[1]) for h in range(c.kv_heads)
                  for kb in range(nk) if read[h, kb])
    read_bytes = 2 * kv_rows * c.head_dim * dtype.itemsize
    io_bytes = 2 * c.heads * c.lq * c.head_dim * dtype.itemsize  # q in, out
    floor = (read_bytes + io_bytes) / bw
    row = {"case": c.name, "lq": c.lq, "lk": c.lk, "density": c.density, "dtype": c.dtype,
           "cache_mb": cache_bytes / 2**20, "read_fraction": read_bytes / cache_bytes,
           "ours_us": times["ours"] * 1e6}
    for name in ("transformers_sdpa", "sdpa_repeat_kv", "sdpa_gqa"):
        row[f"{name}_us"] = times.get(name, float("nan")) * 1e6
    for name in ("transformers_sdpa", "sdpa_repeat_kv", "sdpa_gqa"):
        row[f"x_vs_{name}"] = times.get(name, float("nan")) / times["ours"]
    row["floor_us"] = floor * 1e6
    row["efficiency_ours"] = floor / times["ours"]
    row["efficiency_sdpa_gqa"] = ((cache_bytes + io_bytes) / bw) / times["sdpa_gqa"]
    return row


def call_overhead_rows(reps: int) -> list[dict]:
    """The fixed cost of one call: one query, one key block (16 keys), 9 / 3 heads, fp32 —
    through the public function, the torch.ops custom op, the C++ kernel alone, and SDPA."""
    from sparsekernels.ops import _ext

    q = torch.randn(1, 9, 1, 64)
    k, v = torch.randn(1, 3, 16, 64), torch.randn(1, 3, 16, 64)
    layout = torch.ones(9, 1, 1, dtype=torch.bool)
    kernel = _ext.op(OP, "cpu")
    lay4 = layout.unsqueeze(0)
    fns = {"public op": lambda: block_sparse_attention(q, k, v, layout, (16, 64), causal=True,
                                                       backend="cpu"),
           "torch.ops custom op": lambda: torch.ops.sparsekernels.block_sparse_attention(
               q, k, v, layout, None, True, 0, 0.125, 16, 64, 0.0, 0, "cpu"),
           "C++ kernel alone": lambda: kernel(q, k, v, lay4, None, True, 0, 0.125, 16, 64, True),
           "F.sdpa enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v,
                                                                       enable_gqa=True)}
    hf = _transformers_sdpa()
    if hf is not None:
        module = _Module(3)
        fns["transformers sdpa"] = lambda: hf(module, q, k, v, None, scaling=0.125)
    times = time_interleaved(fns, torch.device("cpu"), reps=reps, warmup=20, budget_s=30)
    return [{"case": f"call: {name}", "lq": 1, "lk": 16, "ours_us": t * 1e6}
            for name, t in times.items()]


def run_decode(smoke: bool, reps: int) -> list[dict]:
    bw = measure_bandwidth(torch.device("cpu"))
    rows = []
    for c in decode_cases(smoke):
        row = run_decode_case(c, bw, reps)
        rows.append(row)
        print(f"{row['case']:<28} ours {row['ours_us']:8.1f} us  x{row['x_vs_transformers_sdpa']:.2f}"
              f" vs transformers, x{row['x_vs_sdpa_gqa']:.2f} vs sdpa gqa, efficiency "
              f"{row['efficiency_ours']:.2f}", flush=True)
    for row in call_overhead_rows(20 if smoke else 2000):
        rows.append(row)
        print(f"{row['case']:<28} {row['ours_us']:8.1f} us", flush=True)
    if smoke:
        return rows
    notes = [f"Measured copy bandwidth {bw / 1e9:.1f} GB/s. x_vs_* = baseline time / ours "
             "(interleaved medians, each call on a different cache of a rotation larger than "
             "the L3). floor = bytes ours reads (the stored key blocks of any head of a group, "
             "K and V, plus q and out) / bandwidth; efficiency = floor / time; "
             "efficiency_sdpa_gqa uses the whole cache's bytes. read_fraction: the share of the "
             "cache ours reads. 9 query heads / 3 key/value heads, head dim 64, causal, blocks "
             "16x64; 'call:' rows are the fixed cost of one call (one query, 16 keys)."]
    cols = ["case", "cache_mb", "read_fraction", "ours_us", "transformers_sdpa_us",
            "sdpa_repeat_kv_us", "sdpa_gqa_us", "x_vs_transformers_sdpa", "x_vs_sdpa_repeat_kv",
            "x_vs_sdpa_gqa", "floor_us", "efficiency_ours", "efficiency_sdpa_gqa"]
    out_dir = write_results(torch.device("cpu"), "attention_decode",
                            "Block-sparse attention at decode: grouped heads against a KV cache",
                            rows, notes, cols)
    print(f"wrote {out_dir}/attention_decode.csv and .md")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny cases, seconds (CI)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles)")
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--decode", action="store_true",
                        help="decode against a KV cache (CPU), not the prefill matrix")
    parser.add_argument("--decode-reps", type=int, default=200)
    parser.add_argument("--headline", action="store_true",
                        help="only the headline points (tools/gpu_check.py); with --smoke, the "
                             "same list at a size a CPU runs in seconds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.decode or (args.smoke and device.type == "cpu" and not args.headline):
        run_decode(args.smoke, 5 if args.smoke else args.decode_reps)
        if args.decode:
            return 0
    todo = (headline_cases if args.headline else cases)(device, args.smoke)
    if args.max_seq_len:
        todo = [c for c in todo if c.seq_len <= args.max_seq_len]
    dtype = getattr(torch, todo[0].dtype)
    peak = measure_peak_flops(device, dtype, n=1024 if args.smoke else None)
    bw = measure_bandwidth(device)
    rows = []
    for c in todo:
        for row in run_case(c, device, peak, bw, 3 if args.smoke else args.reps,
                            flex=not args.no_flex and not args.smoke):
            rows.append(row)
            print(f"{row['case']:<28} {row['pass']:<8} dense {row['dense_sdpa_ms']:8.2f} ms  "
                  f"flex {row['flex_ms']:8.2f}  ours x{row['speedup_vs_dense']:.2f} vs dense, "
                  f"x{row['speedup_vs_flex']:.2f} vs flex", flush=True)
    if args.smoke:
        return 0  # a smoke run checks the script runs; it is not a measurement
    notes = [f"Measured peak {peak / 1e12:.2f} TFLOP/s ({todo[0].dtype} matmul), copy "
             f"bandwidth {bw / 1e9:.1f} GB/s. speedup_* = baseline time / our best backend's "
             "time; efficiency = floor / time (forward only). Layout blocks 64x64, 12 heads, "
             "head dim 64. n/a: the baseline does not run on this device."]
    cols = ["case", "pass", "block_density", "dense_sdpa_ms", "flex_ms", "torch_bsr_sdpa_ms",
            "ours_cpu_ms", "ours_triton_ms", "ours_cuda_ms", "speedup_vs_dense",
            "speedup_vs_flex", "tflops_ours", "efficiency_ours"]
    name = "attention"
    out_dir = write_results(device, name, "Block-sparse attention vs dense SDPA / FlexAttention",
                            rows, notes, cols)
    print(f"wrote {out_dir}/{name}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
