"""Shared benchmark plumbing (BENCH.md): device naming, headers, timing, floors, writers.

Timing is interleaved: the candidates of one case run in turn within each repetition, so a
noisy neighbour slows them alike, and ratios are medians of per-repetition ratios.
"""

from __future__ import annotations

import csv
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# another folder in place of bench/results (tools/gpu_check.py gathers a run's files there)
ENV_RESULTS = "SPARSEKERNELS_BENCH_RESULTS"


def results_root() -> Path:
    """Where results are written: bench/results, or the folder SPARSEKERNELS_BENCH_RESULTS names."""
    return Path(os.environ.get(ENV_RESULTS) or RESULTS)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100", "l40s", "l4", "a10g", "4090"):
            if key in name:
                return f"nvidia-{key}"
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1]
                break
    except OSError:
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
    slug = "-".join(w for w in slug.split("-") if w not in ("processor", "core", "tm", "r"))[:24]
    return f"cpu-{slug}-{torch.get_num_threads()}t"


def header(device: torch.device, title: str) -> list[str]:
    lines = [f"# {title}", "",
             f"- device: {device_name(device)}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
             f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'n/a'}, "
             f"threads {torch.get_num_threads()}, python {platform.python_version()}"]
    try:
        import importlib.metadata as md
        lines.append(f"- triton {md.version('triton')}, transformers {md.version('transformers')}")
    except Exception:
        pass
    lines.append(f"- command: `{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`")
    return lines


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 10,
                     warmup: int = 2, budget_s: float = 20.0) -> dict[str, float]:
    """Median seconds per candidate, running the candidates in turn within each repetition
    (in a shuffled order).
    A candidate slower than budget_s/reps per call is measured fewer times (min 1)."""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_s
    # a fresh order each repetition: a candidate can be slowed by the one before it (threads
    # still spinning, caches), and rotating a fixed order would keep every candidate's
    # predecessor; seeded, so a run is repeatable
    order = random.Random(0)
    for rep in range(reps):
        for name in order.sample(list(fns), len(fns)):
            samples[name].append(_time_once(fns[name], device))
        if time.perf_counter() > deadline and rep >= 2:
            break
    return {name: statistics.median(s) for name, s in samples.items()}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of a large dense matmul in `dtype`: the arithmetic roof on this machine."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_interleaved({"mm": lambda: a @ b}, device, reps=5)["mm"]
    return 2 * n ** 3 / t


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large copy (bytes read plus written): the memory roof on this machine."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, device, reps=5)["copy"]
    return 2 * n / t


def write_results(device: torch.device, name: str, title: str, rows: list[dict],
                  notes: list[str] | None = None, md_columns: list[str] | None = None) -> Path:
    out_dir = results_root() / device_name(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    head = header(device, title)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        for line in head:
            f.write(f"# {line.lstrip('# ')}\n")
        fields = list(dict.fromkeys(k for row in rows for k in row))  # every row's columns
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    cols = md_columns or list(rows[0])
    md = head + [""] + (notes or []) + ["", "| " + " | ".join(cols) + " |",
                                        "|" + "---|" * len(cols)]
    for row in rows:
        md.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    return out_dir


def read_results(path: str | os.PathLike) -> list[dict]:
    """Rows of a results CSV written by write_results (its # header skipped), numbers as
    floats, text as text; [] when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
    return rows


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# -- peak memory ----------------------------------------------------------------------------

def _is_wrapper(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a wrapper subclass (BlockSparseTensor) counts its inner tensors."""
    if _is_wrapper(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.untyped_storage().nbytes() if t.numel() else 0


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once (tied weights are shared)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if _is_wrapper(t) else t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


def _heap_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not had back (arena + mmapped chunks)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                    "usmblks", "fsmblks", "uordblks", "fordblks",
                                                    "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    info = fn()
    return info.uordblks + info.hblkhd


def peak_activation_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated above what was live before fn() ran (activations, workspaces).
    CUDA: the caching allocator's peak. CPU: the malloc heap sampled after every aten op
    (a TorchDispatchMode), so temporaries freed inside one kernel are not seen."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if _heap_in_use() is None:
        return None
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sampler(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Sampler.peak = max(Sampler.peak, _heap_in_use())
            return out

    import gc

    for _ in range(2):  # the first pass pays one-time allocations (MKL buffers, the mode itself)
        gc.collect()
        base = _heap_in_use()
        Sampler.peak = base
        with Sampler():
            out = fn()
        del out
    return Sampler.peak - base


def kernel_bench_parser(doc: str) -> "argparse.ArgumentParser":
    """The options every kernel bench takes (bench_bsr_linear, bench_ffn)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="kernel to time (auto: best for device)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="a few tiny cases; nothing written")
    p.add_argument("--limit", type=int, default=0, help="run only the first N cases")
    p.add_argument("--headline", action="store_true",
                   help="only the headline points (tools/gpu_check.py); with --smoke, the same "
                        "list at a size a CPU runs in seconds")
    return p


def kernel_bench_setup(args, cases_fn: Callable, op: str):
    """(device, backend, cases, peak FLOP/s per dtype, copy bandwidth) for a kernel bench."""
    from sparsekernels.ops.router import route

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cases = cases_fn(device, args.smoke)
    dtype = getattr(torch, cases[0].dtype) if cases else torch.float32
    backend = route(op, device, dtype, args.backend).backend
    if args.limit:
        cases = cases[: args.limit]
    peaks = {d: measure_peak_flops(device, getattr(torch, d), n=1024 if args.smoke else None)
             for d in sorted({c.dtype for c in cases})}
    return device, backend, cases, peaks, measure_bandwidth(device)
