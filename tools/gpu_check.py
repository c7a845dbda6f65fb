#!/usr/bin/env python3
"""The prepared GPU check (issue 22): build the extension for sm_90, run the GPU tests, each
bench's headline points and the pruning recipe on the GPU, and measure the dense/sparse
crossover. Every phase is timed and stopped at its cap, so a slow or broken phase costs only
itself; the script exits 0 whatever failed (the summary says what).

    python3 tools/gpu_check.py                 # on the GPU machine (make gpu-check)
    python3 tools/gpu_check.py --dry-run       # on a CPU: each phase in its CPU form
    python3 tools/gpu_check.py --only bench_attention,demo --skip-build     # a rerun
    python3 tools/gpu_check.py --list          # the phases, their caps and commands

GPU_CHECK_DRY_RUN=1 is --dry-run. Results go to one folder, $OUT when set, else
build/gpu-check/out, as at most 8 files (the device tool brings back no more):
  gpu_check.log    every phase's output, in order
  summary.md       phases (status, seconds, cap), the issue's targets against the measured
                   numbers, each bench's table, the recipe's report
  summary.json     the same for programs
  results.tar.gz   bench/results/<device>/* and (when this run measured it)
                   sparsekernels/ops/crossover.json, paths from the repository root:
                   `tar -xzf results.tar.gz -C <checkout>` puts them in place
They are rewritten after every phase, so a run stopped from outside still leaves its results.

Budget: the caps add up to 470 s (under 8 minutes on an H100, build included). A phase may
use what the phases before it left of their caps, never more, so the whole stays in the sum;
the last phase (pytest_slow, the GPU suite's slow matrix) has no cap of its own and runs only
in what the others left, when that is 30 s or more.

How to run it when a GPU is lent (device tool; 15 device minutes in all, start and idle
time counted; one command at most 10 minutes):
  1. The call sends the session's own checkout (the lead's), not a helper's worktree:
     merge this branch first. Carry nothing: the extension must be built there (sm_90, the
     image's Python 3.12 and torch), and the script makes its demo model and data itself.
  2. run(command="PYTHONUNBUFFERED=1 python3 tools/gpu_check.py", timeout_s=540)
     (470 s of caps plus margin; with the machine's start, about 10 of the 15 minutes).
     The reply's output_tail ends with the phase table, the targets and the file list.
  3. If a phase failed for a reason you can fix, fix it here, then rerun at once on the warm
     machine (it keeps the built extension and build/gpu-check between calls; the tracked
     files are laid anew from the checkout), only what failed, with a timeout that fits
     status's budget_left_s less a minute, e.g.
       run(command="PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --skip-build
                    --only bench_attention,demo --cap bench_attention=120", timeout_s=240)
     then give_back. A rerun's $OUT holds only its own phases' results: fetch and unpack the
     first run's before it (the tool keeps only the latest command's files).
  4. Here: the files lie under the reply's files_at, read-only. Put the results in place
     and look before committing:
       tar -xzf <files_at>/results.tar.gz -C /work/main
       git -C /work/main status; git -C /work/main diff sparsekernels/ops/crossover.json
     (bench/results/nvidia-h100/ or nvidia-h200/ per the card; the CPU crossover entries
     are kept). Read summary.md for the targets, gpu_check.log for the details.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DEFAULT_WORK = REPO / "build" / "gpu-check"
DEMO_CONFIG = REPO / "configs" / "gpu-check.yaml"

# the device tool's limits on what comes back from $OUT
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2 ** 20
MAX_TOTAL_BYTES = 64 * 2 ** 20
MAX_DEPTH = 2  # folders below $OUT
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_NAME, SUMMARY_MD, SUMMARY_JSON, TARBALL = ("gpu_check.log", "summary.md", "summary.json",
                                               "results.tar.gz")
PLANNED = (LOG_NAME, SUMMARY_MD, SUMMARY_JSON, TARBALL)
LOG_MAX_BYTES = 15 * 2 ** 20  # the log stays under MAX_FILE_BYTES
PHASE_LOG_MAX_BYTES = 4 * 2 ** 20  # past this a phase's lines are counted, its tail kept
KILL_GRACE_S = 5.0  # SIGINT first (pytest and the recipe say where they were), then SIGKILL


# --- phases ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Phase:
    """One step of the check: a command, its cap, and its CPU form for a dry run (None: the
    dry run skips it and says so)."""

    name: str
    cap_s: float
    argv: tuple[str, ...]
    dry_argv: Optional[tuple[str, ...]]
    dry_cap_s: float = 300.0
    env: tuple[tuple[str, str], ...] = ()
    min_s: float = 0.0  # skipped when the budget allows less (a phase of leftover time)
    about: str = ""


PY = "{python}"  # replaced by the interpreter that runs the phases


def pytest_args(marks: str) -> tuple[str, ...]:
    """pytest -m MARKS, spread over worker processes when pytest-xdist is there (the Triton
    kernels compile on CPU cores: one process would spend most of its cap compiling), with
    a per-test timeout when pytest-timeout is."""
    import importlib.util

    args = ["-m", "pytest", "-m", marks, "-v", "-p", "no:cacheprovider", "--durations=10"]
    cpus = os.cpu_count() or 1
    if importlib.util.find_spec("xdist") is not None and cpus >= 4:
        args += ["-n", str(min(12, cpus - 2))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", "120"]
    return tuple(args)


def phases() -> list[Phase]:
    cpus = str(os.cpu_count() or 1)
    collect = (PY, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider")
    return [
        Phase("env", 10, (PY, str(SCRIPT), "_env"), (PY, str(SCRIPT), "_env"), 60,
              about="GPU, driver, nvcc, Python packages"),
        Phase("build", 105, (PY, "setup.py", "build_ext", "--inplace"), None,
              env=(("TORCH_CUDA_ARCH_LIST", "9.0"), ("MAX_JOBS", cpus)),
              about="the extension in place, sm_90 only"),
        Phase("import", 30, (PY, str(SCRIPT), "_import"), (PY, str(SCRIPT), "_import"), 90,
              about="the built extension loads; each GPU backend against float64 once"),
        Phase("pytest", 55, (PY, *pytest_args("gpu and not slow")), collect, 180,
              about="the GPU test suite but its slow matrix (pytest -m 'gpu and not slow')"),
        Phase("bench_bsr_linear", 55,
              (PY, "bench/bench_bsr_linear.py", "--headline", "--write-crossover"),
              (PY, "bench/bench_bsr_linear.py", "--headline", "--smoke"), 400,
              about="768->3072 and 3072->768 at 8192 tokens; the crossover"),
        Phase("bench_ffn", 35, (PY, "bench/bench_ffn.py", "--headline"),
              (PY, "bench/bench_ffn.py", "--headline", "--smoke"), 300,
              about="the fused BERT-base FFN at 8192 tokens"),
        Phase("bench_attention", 85, (PY, "bench/bench_attention.py", "--headline"),
              (PY, "bench/bench_attention.py", "--headline", "--smoke"), 300,
              about="L=4096 at block density 0.25 and 1 vs flash SDPA and FlexAttention"),
        Phase("bench_models", 45, (PY, "bench/bench_models.py", "--headline"),
              (PY, "bench/bench_models.py", "--headline", "--smoke"), 300,
              about="BERT-base kernel mode at 70% block sparsity, batch 32 x 128"),
        Phase("demo", 50, (PY, str(SCRIPT), "_demo"), (PY, str(SCRIPT), "_demo", "--quick"), 600,
              about="the recipe on the GPU (configs/gpu-check.yaml), interrupted and resumed"),
        Phase("pytest_slow", 0, (PY, *pytest_args("gpu and slow")), None, min_s=30,
              about="the GPU suite's slow matrix, in the time the other phases left (if 30 s)"),
    ]


PHASE_NAMES = tuple(p.name for p in phases())
TOTAL_CAP_S = sum(p.cap_s for p in phases())


@dataclasses.dataclass
class PhaseResult:
    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float = 0.0
    cap_s: float = 0.0
    rc: Optional[int] = None
    note: str = ""


class Budget:
    """Each phase gets its cap plus what the phases before it left of theirs (or less, when
    one overran while being stopped): the elapsed total never passes the sum of the caps by
    more than one kill grace."""

    def __init__(self) -> None:
        self.bank = 0.0

    def allow(self, cap_s: float) -> float:
        return max(1.0, cap_s + self.bank)

    def spend(self, allowed_s: float, used_s: float) -> None:
        self.bank = allowed_s - used_s


class Log:
    """The combined log (one file), each line written as it comes; a phase that prints more
    than PHASE_LOG_MAX_BYTES keeps its last lines, and the file stays under LOG_MAX_BYTES."""

    def __init__(self, path: Path, echo: Callable[[str], None] = print) -> None:
        self.path = path
        self.echo = echo
        self.bytes = 0
        self._lock = threading.Lock()
        self._file = open(path, "w", encoding="utf-8", errors="replace")
        self._phase_bytes = 0
        self._dropped = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=200)

    def _put(self, text: str) -> None:
        data = len(text.encode("utf-8", "replace"))
        if self.bytes + data > LOG_MAX_BYTES:
            return
        self._file.write(text)
        self._file.flush()
        self.bytes += data

    def note(self, line: str, echo: bool = True) -> None:
        with self._lock:
            self._put(line.rstrip("\n") + "\n")
        if echo:
            self.echo(line.rstrip("\n"))

    def begin_phase(self) -> None:
        with self._lock:
            self._phase_bytes, self._dropped = 0, 0
            self.tail.clear()

    def phase_line(self, line: str) -> None:
        with self._lock:
            self.tail.append(line)
            size = len(line.encode("utf-8", "replace"))
            if self._phase_bytes + size > PHASE_LOG_MAX_BYTES:
                self._dropped += 1
                return
            self._phase_bytes += size
            self._put(line)

    def end_phase(self) -> None:
        with self._lock:
            if self._dropped:
                self._put(f"[gpu_check] {self._dropped} lines left out of the log; the last "
                          f"{len(self.tail)}:\n")
                for line in self.tail:
                    self._put(line)

    def close(self) -> None:
        self._file.close()


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to the phase's process group (it runs in its own session), then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_phase(name: str, argv: Sequence[str], cap_s: float, log: Log, env: dict, cwd: Path,
              grace_s: float = KILL_GRACE_S, echo_tail: int = 12) -> PhaseResult:
    """Run argv with its output into the log; stop it (and everything it started) at cap_s."""
    log.begin_phase()
    log.note(f"\n== {name} (stopped after {cap_s:.0f} s): {shlex.join(argv)}")
    start = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as exc:
        log.note(f"[gpu_check] {name}: could not start: {exc}")
        return PhaseResult(name, "failed", 0.0, cap_s, None, f"could not start: {exc}")

    def pump():
        for raw in proc.stdout:
            log.phase_line(raw.decode("utf-8", "replace"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc, grace_s)
        rc = proc.poll()
    except KeyboardInterrupt:  # the phase runs in its own session: stop it too
        _stop(proc, grace_s)
        raise
    reader.join(timeout=5.0)
    seconds = time.monotonic() - start
    log.end_phase()
    if timed_out:
        status, note = "timeout", f"stopped at its cap ({cap_s:.0f} s)"
    elif rc == 0:
        status, note = "ok", ""
    else:
        status, note = "failed", f"exit code {rc}"
    for line in list(log.tail)[-echo_tail:]:
        log.echo("   | " + line.rstrip("\n"))
    log.note(f"-- {name}: {status} in {seconds:.1f} s" + (f" ({note})" if note else ""))
    return PhaseResult(name, status, round(seconds, 1), round(cap_s, 1), rc, note)


# --- the results folder ---------------------------------------------------------------------
def check_out_dir(out_dir: Path) -> list[str]:
    """What in out_dir breaks the device tool's limits on files back from $OUT (empty: none)."""
    problems, total = [], 0
    paths = sorted(p for p in out_dir.rglob("*") if not p.is_dir() or p.is_symlink())
    if len(paths) > MAX_FILES:
        problems.append(f"{len(paths)} files; at most {MAX_FILES} come back")
    for path in paths:
        rel = path.relative_to(out_dir)
        if path.is_symlink() or not path.is_file():
            problems.append(f"{rel}: not a plain file")
            continue
        if len(rel.parts) - 1 > MAX_DEPTH:
            problems.append(f"{rel}: more than {MAX_DEPTH} folders down")
        if not all(NAME_OK.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, . _ -")
        size = path.stat().st_size
        total += size
        if size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {size} bytes, over {MAX_FILE_BYTES}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total} bytes in all, over {MAX_TOTAL_BYTES}")
    return problems


def write_out(out_dir: Path, name: str, data: bytes) -> Path:
    """Write one of the planned result files (atomically); anything else is refused, so the
    folder never holds more than the tool brings back."""
    if name not in PLANNED:
        raise ValueError(f"{name!r} is not one of the planned result files {PLANNED}")
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{name}: {len(data)} bytes, over the {MAX_FILE_BYTES} that come back")
    path = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def results_tarball(results_dir: Path, extra: Sequence[Path] = ()) -> bytes:
    """results_dir/<device>/* as bench/results/<device>/*, and each extra file (inside the
    repository) at its path from the repository root."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if results_dir.is_dir():
            for path in sorted(results_dir.rglob("*")):
                if path.is_file() and not path.name.endswith(".tmp"):
                    rel = path.relative_to(results_dir)
                    tar.add(path, arcname=str(Path("bench/results") / rel))
        for path in extra:
            if path.is_file():
                tar.add(path, arcname=str(path.resolve().relative_to(REPO)))
    return buf.getvalue()


# --- targets (issue 22) ---------------------------------------------------------------------
def _rows(results_dir: Path, name: str) -> list[dict]:
    """The rows of results_dir/<device>/<name>.csv, numbers as floats (as bench/common.py's
    read_results, which would import torch into this process)."""
    import csv

    found = sorted(results_dir.glob(f"*/{name}.csv"))
    if not found:
        return []
    with open(found[0]) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
    return rows


def _num(row: dict, key: str) -> float:
    value = row.get(key)
    return value if isinstance(value, float) else float("nan")


def _verdict(values: list[float], ok: Callable[[float], bool],
             fmt: str = "{:.2f}") -> tuple[str, str]:
    values = [v for v in values if v == v]
    if not values:
        return "n/a", "n/a"
    shown = ", ".join(fmt.format(v) for v in values)
    return shown, "pass" if all(ok(v) for v in values) else "MISS"


def targets(results_dir: Path) -> list[tuple[str, str, str]]:
    """(target, measured, pass / MISS / n/a) for each target the issue names."""
    out = []
    try:
        lin = _rows(results_dir, "bsr_linear")
    except Exception as exc:  # the orchestrator must not die on a results file
        return [("reading the results", f"{type(exc).__name__}: {exc}", "n/a")]
    for block, least in (("64x64", 0.7), ("32x32", 0.5)):
        rows = [r for r in lin if r.get("block") == block and _num(r, "density") <= 0.5]
        out.append((f"bsr_linear efficiency >= {least} at block {block[:2]}, density <= 0.5",
                    *_verdict([_num(r, "efficiency") for r in rows], lambda v, t=least: v >= t)))
    out.append(("bsr_linear faster than torch.sparse BSR at every point (x)",
                *_verdict([_num(r, "vs_torch_bsr") for r in lin], lambda v: v > 1.0)))
    out.append(("bsr_linear fwd+bwd faster than dense at density <= 0.3 (x)",
                *_verdict([_num(r, "fwdbwd_speedup") for r in lin if _num(r, "density") <= 0.3],
                          lambda v: v > 1.0)))
    att = _rows(results_dir, "attention")
    for pas in ("fwd", "fwd+bwd"):
        sparse = [r for r in att
                  if r.get("pass") == pas and abs(_num(r, "block_density") - 0.25) < 0.02]
        full = [r for r in att if r.get("pass") == pas and _num(r, "block_density") > 0.99]
        out.append((f"attention {pas} at density 0.25: >= 3x dense SDPA",
                    *_verdict([_num(r, "speedup_vs_dense") for r in sparse], lambda v: v >= 3.0)))
        out.append((f"attention {pas} at density 0.25: >= 1.2x FlexAttention",
                    *_verdict([_num(r, "speedup_vs_flex") for r in sparse], lambda v: v >= 1.2)))
        out.append((f"attention {pas} at density 1: within 1.3x of SDPA (x vs dense)",
                    *_verdict([_num(r, "speedup_vs_dense") for r in full], lambda v: v >= 1 / 1.3)))
    models = [r for r in _rows(results_dir, "models") if r.get("model") == "bert-base"
              and r.get("masks") == "block" and abs(_num(r, "sparsity") - 0.7) < 1e-6]
    out.append(("BERT-base kernel mode at 70% blocks: >= 1.5x dense",
                *_verdict([_num(r, "kernel_speedup") for r in models], lambda v: v >= 1.5)))
    return out


# --- the summary ----------------------------------------------------------------------------
def _md_table(head: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def summarize(results: list[PhaseResult], work: Path, dry_run: bool, argv: Sequence[str],
              pending: Sequence[str] = ()) -> tuple[dict, str]:
    env = {}
    try:
        env = json.loads((work / "env.json").read_text())
    except (OSError, ValueError):
        pass
    results_dir = work / "results"
    goals = targets(results_dir)
    data = {"mode": "dry-run" if dry_run else "gpu", "command": list(argv), "env": env,
            "total_cap_s": sum(r.cap_s for r in results if r.status != "skipped"),
            "total_s": round(sum(r.seconds for r in results), 1),
            "phases": [dataclasses.asdict(r) for r in results], "pending": list(pending),
            "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in goals]}
    md = [f"# GPU check{' (dry run on a CPU)' if dry_run else ''}: "
          f"{env.get('device', '?')} ({env.get('gpu') or 'no GPU'})", "",
          f"- {time.strftime('%Y-%m-%d %H:%M:%S')}; command: "
          f"`{shlex.join(['tools/gpu_check.py', *argv])}`",
          f"- torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, triton "
          f"{env.get('triton', '?')}, transformers {env.get('transformers', '?')}, python "
          f"{env.get('python', '?')}", "", "## Phases", ""]
    md += _md_table(("phase", "status", "seconds", "cap", "note"),
                    [(r.name, r.status, f"{r.seconds:.1f}",
                      "" if r.status == "skipped" else f"{r.cap_s:.0f}", r.note)
                     for r in results] + [(name, "not reached", "", "", "") for name in pending])
    md += ["", f"Total {data['total_s']:.0f} s.", "", "## Targets (issue 22)", ""]
    md += _md_table(("target", "measured", "verdict"), goals)
    for path in sorted(results_dir.glob("*/*.md")):
        md += ["", f"## {path.stem} ({path.parent.name})", ""]
        md += [line.replace("# ", "### ", 1) if line.startswith("# ") else line
               for line in path.read_text().splitlines()]
    report = work / "demo" / "run" / "report.md"
    if report.exists():
        md += ["", "## The recipe's report (demo phase)", ""]
        md += [("#" + line) if line.startswith("#") else line
               for line in report.read_text().splitlines()]
    return data, "\n".join(md) + "\n"


def finalize(out_dir: Path, results: list[PhaseResult], work: Path, dry_run: bool,
             argv: Sequence[str], pending: Sequence[str] = ()) -> None:
    data, md = summarize(results, work, dry_run, argv, pending)
    write_out(out_dir, SUMMARY_JSON, (json.dumps(data, indent=2) + "\n").encode())
    write_out(out_dir, SUMMARY_MD, md.encode())
    # the crossover only when this run measured it: each call lays the checkout's own copy
    # anew, so a rerun's would undo the first run's when unpacked over it
    measured = not dry_run and any(r.name == "bench_bsr_linear" and r.status == "ok"
                                   for r in results)
    crossover = [REPO / "sparsekernels" / "ops" / "crossover.json"] if measured else []
    write_out(out_dir, TARBALL, results_tarball(work / "results", crossover))


def summary_table(results: list[PhaseResult]) -> str:
    lines = [f"{'phase':<18} {'status':<9} {'seconds':>8} {'cap':>5}  note"]
    for r in results:
        cap = "" if r.status == "skipped" else f"{r.cap_s:.0f}"
        lines.append(f"{r.name:<18} {r.status:<9} {r.seconds:>8.1f} {cap:>5}  {r.note}")
    lines.append(f"{'total':<18} {'':<9} {sum(r.seconds for r in results):>8.1f} "
                 f"{sum(r.cap_s for r in results if r.status != 'skipped'):>5.0f}")
    return "\n".join(lines)


# --- the driver -----------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="phases: " + ", ".join(PHASE_NAMES))
    p.add_argument("--dry-run", action="store_true",
                   default=os.environ.get("GPU_CHECK_DRY_RUN", "0") not in ("", "0"),
                   help="each phase in its CPU form (GPU_CHECK_DRY_RUN=1 too)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="the results folder (default: $OUT, else build/gpu-check/out)")
    p.add_argument("--work", default=str(DEFAULT_WORK),
                   help="scratch folder: bench results, demo model, data and run")
    p.add_argument("--only", default="", help="comma-separated phases to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out")
    p.add_argument("--skip-build", action="store_true", help="same as --skip build")
    p.add_argument("--cap", action="append", default=[], metavar="PHASE=SECONDS",
                   help="another cap for a phase (repeatable)")
    p.add_argument("--python", default=sys.executable, help="the interpreter for the phases")
    p.add_argument("--list", action="store_true", help="print the phases and exit")
    args = p.parse_args(argv)
    names = lambda s: [n for n in s.split(",") if n]
    for option in ("only", "skip"):
        unknown = [n for n in names(getattr(args, option)) if n not in PHASE_NAMES]
        if unknown:
            p.error(f"--{option}: unknown phase {unknown[0]!r}; phases: {', '.join(PHASE_NAMES)}")
    args.only = names(args.only)
    args.skip = names(args.skip) + (["build"] if args.skip_build else [])
    caps = {}
    for item in args.cap:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in PHASE_NAMES or seconds <= 0:
            p.error(f"--cap {item!r}: expected PHASE=SECONDS with a phase of "
                    f"{', '.join(PHASE_NAMES)} and SECONDS > 0")
        caps[name] = seconds
    args.caps = caps
    return args


def plan(args: argparse.Namespace) -> list[tuple[Phase, Optional[tuple[str, ...]], float]]:
    """(phase, argv or None when skipped, cap) in order."""
    out = []
    for phase in phases():
        argv = phase.dry_argv if args.dry_run else phase.argv
        if (args.only and phase.name not in args.only) or phase.name in args.skip:
            argv = None
        cap = args.caps.get(phase.name, phase.dry_cap_s if args.dry_run else phase.cap_s)
        out.append((phase, None if argv is None else tuple(
            args.python if a == PY else a for a in argv), cap))
    return out


def phase_env(work: Path, phase: Phase, build_ok: bool) -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TRITON_INTERPRET="0", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               SPARSEKERNELS_BENCH_RESULTS=str(work / "results"),
               GPU_CHECK_WORK=str(work))
    env.pop("SPARSEKERNELS_BACKEND", None)  # auto everywhere: what a user gets
    env.pop("SPARSEKERNELS_DENSE_CROSSOVER", None)
    if build_ok:  # a test that needs the built kernels fails instead of skipping
        env["SPARSEKERNELS_REQUIRE_EXT"] = "1"
    env.update(dict(phase.env))
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in INTERNAL:
        return INTERNAL[argv[0]](argv[1:])
    args = parse_args(argv)
    steps = plan(args)
    if hasattr(sys.stdout, "reconfigure"):  # each line as it comes, also into a pipe
        sys.stdout.reconfigure(line_buffering=True)
    if args.list:
        for phase, cmd, cap in steps:
            print(f"{phase.name:<18} cap {cap:>4.0f} s  {shlex.join(cmd) if cmd else '(skipped)'}"
                  f"\n{'':<18} {phase.about}")
        print(f"total cap {sum(cap for _, cmd, cap in steps if cmd):.0f} s")
        return 0
    work = Path(args.work).resolve()
    out_dir = Path(args.out).resolve() if args.out else work / "out"
    if not args.out and out_dir.exists():
        shutil.rmtree(out_dir)  # our own default folder: last run's files go
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "results", ignore_errors=True)  # this run's results only
    (work / "results").mkdir()
    log = Log(out_dir / LOG_NAME)
    total = sum(cap for _, cmd, cap in steps if cmd)
    log.note(f"gpu_check{' (dry run)' if args.dry_run else ''}: {len([s for s in steps if s[1]])} "
             f"phases, {total:.0f} s of caps; results in {out_dir}")
    results: list[PhaseResult] = []
    budget = Budget()
    build_ok = False
    started = time.monotonic()
    try:
        finalize(out_dir, results, work, args.dry_run, argv, [p.name for p, c, _ in steps if c])
        for i, (phase, cmd, cap) in enumerate(steps):
            if cmd is None:
                why = "not selected"
                if args.dry_run and phase.dry_argv is None:
                    why = ("dry run: the extension built here is used" if phase.name == "build"
                           else "dry run: nothing to do on a CPU")
                results.append(PhaseResult(phase.name, "skipped", 0.0, cap, None, why))
                continue
            allowed = budget.allow(cap)
            if allowed < phase.min_s:
                results.append(PhaseResult(phase.name, "skipped", 0.0, cap, None,
                                           f"{allowed:.0f} s left, it needs {phase.min_s:.0f}"))
                continue
            env = phase_env(work, phase, build_ok)
            result = run_phase(phase.name, cmd, allowed, log, env, REPO)
            budget.spend(allowed, result.seconds)
            result.cap_s = cap
            if allowed != cap and result.status == "timeout":
                result.note += f" (its cap {cap:.0f} s {allowed - cap:+.0f} s from the others)"
            if phase.name == "build":
                build_ok = result.status == "ok"
            results.append(result)
            finalize(out_dir, results, work, args.dry_run, argv,
                      [p.name for p, c, _ in steps[i + 1:] if c])
    except KeyboardInterrupt:
        log.note("[gpu_check] interrupted: the results so far are written")
    except Exception as exc:  # the orchestrator itself broke: keep what was measured
        log.note(f"[gpu_check] internal error: {type(exc).__name__}: {exc}")
    done = {r.name for r in results}
    try:
        finalize(out_dir, results, work, args.dry_run, argv,
                 [p.name for p, c, _ in steps if c and p.name not in done])
    except Exception as exc:
        log.note(f"[gpu_check] could not write the summary: {type(exc).__name__}: {exc}")
    log.note("\n" + summary_table(results))
    log.note(f"wall time {time.monotonic() - started:.0f} s of {total:.0f} s of caps")
    try:
        for t, m, v in targets(work / "results"):
            log.note(f"  {v:<5} {t}: {m}")
    except Exception:
        pass
    problems = check_out_dir(out_dir)
    log.note(f"\nresults ({out_dir}):")
    for name in PLANNED:
        path = out_dir / name
        if path.exists():
            log.note(f"  {path}  ({path.stat().st_size / 1024:.0f} KiB)")
    log.note("  put them in place: tar -xzf " + str(out_dir / TARBALL) + " -C <checkout>")
    for problem in problems:
        log.note(f"  WARNING, the device tool will not bring this back: {problem}")
    log.close()
    return 0


# --- internal subcommands (run as phases, in their own process) -----------------------------
def _versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def cmd_env(argv: Sequence[str]) -> int:
    """Print the machine and write <work>/env.json for the summary."""
    work = Path(os.environ.get("GPU_CHECK_WORK", DEFAULT_WORK))
    for tool in (["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,"
                  "clocks.max.sm,temperature.gpu,power.draw", "--format=csv"],
                 ["nvcc", "--version"], ["nproc"], ["free", "-g"]):
        if shutil.which(tool[0]):
            out = subprocess.run(tool, capture_output=True, text=True, timeout=20)
            print(f"$ {shlex.join(tool)}\n{(out.stdout + out.stderr).strip()}")
        else:
            print(f"$ {tool[0]}: not found")
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from common import device_name

    info = dict(_versions(), cuda=torch.version.cuda, gpu=None, capability=None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1))
    info["device"] = device_name(device)
    print(json.dumps(info, indent=2))
    (work / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


def _rel_err(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def cmd_import(argv: Sequence[str]) -> int:
    """The built extension loads and registers its kernels; each GPU backend computes one
    small case right (against float64) before the suite and the benches lean on it."""
    import torch
    import torch.nn.functional as F

    import sparsekernels
    from sparsekernels.ops import _ext

    problems = []
    reason = _ext.load()
    print(f"sparsekernels {sparsekernels.__version__}; extension: {reason or 'loaded'}")
    if reason:
        problems.append(reason)
    for op in ("bsr_linear", "bsr_dsd", "bsr_sdd", "bsr_pack", "bsr_ffn", "block_sparse_attention"):
        print(f"  {op:<24} cpu {_ext.has_op(op, 'cpu')!s:<6} cuda {_ext.has_op(op, 'cuda')}")
    from sparsekernels import BlockSparseTensor
    from sparsekernels.formats.functional import sparse_linear
    from sparsekernels.ops.block_sparse_attention import block_sparse_attention
    from sparsekernels.ops.router import route
    from sparsekernels.testing import random_block_mask

    if torch.cuda.is_available():
        device, dtype, backends = torch.device("cuda"), torch.bfloat16, ("triton", "cuda")
        props = torch.cuda.get_device_properties(device)
        print(f"{props.name}: sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2 ** 30:.0f} GiB")
        if (props.major, props.minor) != (9, 0):
            print("  note: the extension is built for sm_90 only: its CUDA kernels need a "
                  "Hopper GPU")
        for op in ("bsr_linear", "block_sparse_attention"):
            if not _ext.has_op(op, "cuda"):
                problems.append(f"the extension has no CUDA kernel for {op}")
    else:
        device, dtype, backends = torch.device("cpu"), torch.float32, ("cpu",)
        print("no CUDA device: the CPU backend only")
    for op, kw in (("bsr_linear", dict(block_size=(32, 32), density=0.3)),
                   ("block_sparse_attention", dict(head_dim=64))):
        print(f"  route {op} {dtype}: {route(op, device, dtype, **kw)}")
    torch.manual_seed(0)
    w = torch.randn(512, 256, device=device, dtype=dtype) / 16
    W = BlockSparseTensor.from_dense(w, (32, 32), random_block_mask((16, 8), 0.3).to(device))
    x = torch.randn(97, 256, device=device, dtype=dtype)
    want = F.linear(x.double(), W.to_dense().double())
    q, k, v = (torch.randn(2, 4, 256, 64, device=device, dtype=dtype) for _ in range(3))
    layout = torch.ones(4, 4, 4, dtype=torch.bool, device=device)
    want_att = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for backend in backends:
        for name, fn, ref in (("bsr_linear", lambda: sparse_linear(x, W, backend=backend), want),
                              ("attention", lambda: block_sparse_attention(
                                  q, k, v, layout, (64, 64), backend=backend), want_att)):
            try:
                err = _rel_err(fn(), ref)
                ok = err <= tol
                verdict = "ok" if ok else "WRONG"
                print(f"  {name} {backend}: rel err {err:.2e} vs float64 ({verdict})")
                if not ok:
                    problems.append(f"{name} {backend}: rel err {err:.2e}")
            except Exception as exc:
                print(f"  {name} {backend}: {type(exc).__name__}: {exc}")
                problems.append(f"{name} {backend}: {type(exc).__name__}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


# the demo: a small random BERT and synthetic sentences (no network there), so the recipe's
# CUDA path runs: device auto, mid-stage checkpoints with the CUDA RNG, --resume
_POSITIVE = ("good", "great", "happy", "love", "excellent", "nice", "fun", "best", "wonderful",
             "fine", "glad", "bright")
_NEGATIVE = ("bad", "awful", "sad", "hate", "terrible", "poor", "worst", "boring", "ugly",
             "wrong", "angry", "dull")


def make_demo_data(folder: Path, n_train: int = 2400, n_eval: int = 400, hidden: int = 256,
                   layers: int = 4, seed: int = 0) -> None:
    """folder/model (a random BERT with its tokenizer; heads of 32, FFN 4 x hidden) and
    folder/{train,eval}.csv: texts whose label is the balance of positive and negative words
    among neutral ones."""
    import csv
    import random

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    rng = random.Random(seed)
    filler = [f"w{i}" for i in range(300)]
    labels = ("negative", "neutral", "positive")
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("eval", n_eval)):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for _ in range(n):
                pos, neg = rng.randint(0, 3), rng.randint(0, 3)
                words = (rng.choices(filler, k=rng.randint(4, 18)) + rng.choices(_POSITIVE, k=pos)
                         + rng.choices(_NEGATIVE, k=neg))
                rng.shuffle(words)
                writer.writerow([" ".join(words), labels[(pos > neg) - (pos < neg) + 1]])
    model_dir = folder / "model"
    model_dir.mkdir(exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_POSITIVE, *_NEGATIVE, *filler]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(str(model_dir))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 32, intermediate_size=4 * hidden,
                        max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(str(model_dir))


def demo_config(folder: Path, quick: bool) -> Path:
    """configs/gpu-check.yaml with its model and data in `folder` (where make_demo_data wrote
    them); quick: fewer steps (the dry run's CPU form)."""
    import yaml

    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["model"]["name_or_path"] = str(folder / "model")
    data["task"].update(train_file=str(folder / "train.csv"), eval_file=str(folder / "eval.csv"))
    data["output_dir"] = str(folder / "run")
    if quick:
        data["task"].update(max_train=320, max_eval=96)
        data["finetune"].update(batch_size=16)
        data["attention"].update(steps=12)
        data["distill"].update(steps=30)
        data["ffn"].update(times=1, taylor_steps=4)
        data["hidden"].update(times=1, taylor_steps=4)
        data["bench"].update(reps=1, batch_size=2, seq_len=16)
    out = folder / ("config-quick.yaml" if quick else "config.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _record(run: Path) -> dict:
    try:
        return json.loads((run / "record.json").read_text())
    except (OSError, ValueError):
        return {}


def cmd_demo(argv: Sequence[str]) -> int:
    """The recipe on the GPU: stopped (SIGINT) once distillation has committed a checkpoint,
    then --resume to the end. Checks device auto chose CUDA (the checkpoint's RNG state has a
    CUDA entry), the resumed run finishes, and the report is written."""
    import torch

    quick = "--quick" in argv
    work = Path(os.environ.get("GPU_CHECK_WORK", DEFAULT_WORK)) / "demo"
    t0 = time.monotonic()
    if quick:  # the dry run's CPU form: a smaller model, fewer examples and steps
        make_demo_data(work, n_train=400, n_eval=100, hidden=64, layers=2)
    else:
        make_demo_data(work)
    print(f"demo data and model in {work} ({time.monotonic() - t0:.1f} s)")
    config = demo_config(work, quick)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "sparsekernels", "prune", str(config), "--output-dir", str(run)]
    print(f"$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    stop = threading.Event()

    def watch():  # SIGINT once distillation has committed a checkpoint (mid-stage or prune)
        while not stop.wait(0.1):
            progress = _record(run).get("distill_progress", {})
            if progress.get("step", 0) > 0:
                print(f"[demo] interrupting at distill step {progress['step']}", flush=True)
                proc.send_signal(signal.SIGINT)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for line in proc.stdout:
        print(line, end="", flush=True)
    rc1 = proc.wait()
    stop.set()
    record = _record(run)
    problems = []
    rng_keys = []
    student = record.get("student")
    if student and (run / student / "rng.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(run / student / "rng.safetensors"), "pt") as f:
            rng_keys = sorted(f.keys())
    print(f"[demo] first run exit {rc1}; stages done {record.get('stages_done')}; "
          f"student checkpoint {student}, RNG state saved: {rng_keys or 'none'}")
    if rc1 not in (0, 130):
        problems.append(f"the first run failed (exit {rc1})")
    if torch.cuda.is_available() and rng_keys and "cuda" not in rng_keys:
        problems.append("the checkpoint has no CUDA RNG state: device auto did not pick the GPU")
    if rc1 == 130:
        print(f"$ {shlex.join(cmd + ['--resume'])}", flush=True)
        rc2 = subprocess.run(cmd + ["--resume"], cwd=REPO).returncode
        print(f"[demo] resumed run exit {rc2}")
        if rc2 != 0:
            problems.append(f"the resumed run failed (exit {rc2})")
    record = _record(run)
    final = record.get("final", {})
    print(f"[demo] stages {record.get('stages_done')}; final accuracy {final.get('accuracy')}, "
          f"encoder sparsity {final.get('sparsity')}, speedup {final.get('speedup')}; "
          f"{time.monotonic() - t0:.0f} s")
    if record.get("stages_done") != ["finetune", "attention", "distill", "final"]:
        problems.append("the recipe did not finish every stage")
    if not (run / "report.md").exists():
        problems.append("no report.md")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


INTERNAL = {"_env": cmd_env, "_import": cmd_import, "_demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
