"""tools/gpu_check.py, the prepared GPU check, on the CPU: a phase past its cap is stopped
(with what it started) and the next phase runs; a failed phase does not stop the run and the
run exits 0; the phases share their caps without passing the sum; and the results folder keeps
to what the device tool brings back (8 files, 16 MiB each, plain names, 2 folders down)."""

import importlib.util
import json
import os
import random
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _log(gc, tmp_path):
    return gc.Log(tmp_path / "log.txt", echo=lambda line: None)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended


def test_a_phase_past_its_cap_is_stopped_and_the_next_runs(gc, tmp_path):
    log = _log(gc, tmp_path)
    cap = random.uniform(1.0, 2.0)
    start = time.monotonic()
    slow = gc.run_phase("slow", _py("import time; print('started', flush=True); time.sleep(60)"),
                        cap, log, dict(os.environ), tmp_path, grace_s=2.0)
    assert slow.status == "timeout" and "stopped at its cap" in slow.note
    assert cap <= slow.seconds < cap + 8 and time.monotonic() - start < cap + 10
    nxt = gc.run_phase("next", _py("print('second phase')"), 30, log, dict(os.environ), tmp_path)
    assert (nxt.status, nxt.rc) == ("ok", 0)
    text = (tmp_path / "log.txt").read_text()
    assert "second phase" in text  # (whether "started" made it depends on the machine's load)
    assert text.index("== slow") < text.index("-- slow: timeout") < text.index("== next")


def test_a_phase_deaf_to_sigint_is_killed_with_its_children(gc, tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('waiting', flush=True); "
            "time.sleep(60)")
    result = gc.run_phase("deaf", _py(code), 1.5, _log(gc, tmp_path), dict(os.environ), tmp_path,
                          grace_s=0.5)
    assert result.status == "timeout" and result.seconds < 10
    child = int(pid_file.read_text())
    for _ in range(50):  # the kernel reaps asynchronously
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), "the phase's child outlived its cap"


def test_a_failed_phase_says_its_exit_code(gc, tmp_path):
    code = random.randint(1, 100)
    result = gc.run_phase("bad", _py(f"import sys; print('oops'); sys.exit({code})"), 30,
                          _log(gc, tmp_path), dict(os.environ), tmp_path)
    assert (result.status, result.rc, result.note) == ("failed", code, f"exit code {code}")
    missing = gc.run_phase("missing", [str(tmp_path / "no-such-program")], 30, _log(gc, tmp_path),
                           dict(os.environ), tmp_path)
    assert missing.status == "failed" and "could not start" in missing.note


def test_budget_lends_what_earlier_phases_left_and_never_passes_the_sum(gc):
    budget = gc.Budget()
    assert budget.allow(10) == 10
    budget.spend(10, 4)
    assert budget.allow(5) == 11  # 6 s left by the first phase
    budget.spend(11, 12)  # overran by 1 s while being stopped
    assert budget.allow(5) == 4
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    budget, caps, used = gc.Budget(), [], []
    for _ in range(50):
        cap = rng.uniform(1, 100)
        allowed = budget.allow(cap)
        spent = min(allowed + rng.uniform(0, 0.5), rng.uniform(0, 3 * cap))  # a kill's grace
        budget.spend(allowed, spent)
        caps.append(cap)
        used.append(spent)
        assert sum(used) <= sum(caps) + 0.5 + 1.0  # one grace, and the 1 s floor of allow()


def test_main_runs_every_phase_writes_the_planned_files_and_exits_0(gc, tmp_path, monkeypatch):
    fake = [gc.Phase("sleepy", 1.0, tuple(_py("import time; time.sleep(60)")), None),
            gc.Phase("broken", 20, tuple(_py("raise SystemExit(3)")), None),
            gc.Phase("fine", 20, (gc.PY, "-c", "print('fine')"), None),
            # phases of leftover time: the first fits in what "broken" and "fine" left
            gc.Phase("leftover", 0, tuple(_py("print('leftover ran')")), None, min_s=10),
            gc.Phase("too_late", 0, tuple(_py("print('too late')")), None, min_s=1000)]
    monkeypatch.setattr(gc, "phases", lambda: fake)
    monkeypatch.setattr(gc, "KILL_GRACE_S", 0.5)
    work, out = tmp_path / "work", tmp_path / "out"
    (out / "stale").mkdir(parents=True)  # $OUT is someone else's folder: left alone
    assert gc.main(["--work", str(work), "--out", str(out)]) == 0
    summary = json.loads((out / gc.SUMMARY_JSON).read_text())
    assert [(p["name"], p["status"]) for p in summary["phases"]] == [
        ("sleepy", "timeout"), ("broken", "failed"), ("fine", "ok"), ("leftover", "ok"),
        ("too_late", "skipped")]
    assert "it needs 1000" in summary["phases"][-1]["note"]
    assert summary["phases"][1]["rc"] == 3 and summary["pending"] == []
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(gc.PLANNED)
    assert gc.check_out_dir(out) == []
    md = (out / gc.SUMMARY_MD).read_text()
    assert "| sleepy | timeout |" in md and "| broken | failed |" in md and "| fine | ok |" in md
    log = (out / gc.LOG_NAME).read_text()
    assert "fine" in log and "leftover ran" in log and "too late" not in log


def test_the_results_folder_keeps_to_the_device_tools_limits(gc, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in gc.PLANNED:
        gc.write_out(out, name, os.urandom(64))
    assert gc.check_out_dir(out) == []
    with pytest.raises(ValueError, match="planned"):
        gc.write_out(out, "extra.csv", b"x")
    with pytest.raises(ValueError, match="over"):
        gc.write_out(out, gc.LOG_NAME, bytes(gc.MAX_FILE_BYTES + 1))
    for i in range(gc.MAX_FILES + 1 - len(gc.PLANNED)):  # one more than comes back
        (out / f"more{i}.txt").write_text("x")
    assert any("at most 8 come back" in p for p in gc.check_out_dir(out))
    for path in out.glob("more*"):
        path.unlink()
    (out / "a b.txt").write_text("x")
    deep = out / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "f.txt").write_text("x")
    with open(out / "big.bin", "wb") as f:
        f.truncate(gc.MAX_FILE_BYTES + 1)
    (out / "link").symlink_to(out / gc.LOG_NAME)
    problems = "\n".join(gc.check_out_dir(out))
    for want in ("a b.txt: a name", "a/b/c/f.txt: more than 2 folders down", "big.bin:",
                 "link: not a plain file"):
        assert want in problems, problems


def test_a_loud_phase_keeps_the_log_small_with_its_last_lines(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "PHASE_LOG_MAX_BYTES", 2000)
    n = random.randint(500, 900)
    log = _log(gc, tmp_path)
    result = gc.run_phase("loud", _py(f"[print('line', i) for i in range({n})]"), 30, log,
                          dict(os.environ), tmp_path)
    log.close()
    text = (tmp_path / "log.txt").read_text()
    assert result.status == "ok" and len(text) < 2000 + 200 * 12 + 500
    assert "lines left out of the log" in text and f"line {n - 1}\n" in text


def test_the_tarball_puts_results_at_their_repository_paths(gc, tmp_path):
    results = tmp_path / "results" / "nvidia-h100"
    results.mkdir(parents=True)
    body = f"# device nvidia-h100\nk,n\n768,{random.randint(1, 9999)}\n"
    (results / "bsr_linear.csv").write_text(body)
    crossover = REPO / "sparsekernels" / "ops" / "crossover.json"
    data = gc.results_tarball(tmp_path / "results", [crossover])
    path = tmp_path / "r.tar.gz"
    path.write_bytes(data)
    with tarfile.open(path) as tar:
        assert sorted(tar.getnames()) == ["bench/results/nvidia-h100/bsr_linear.csv",
                                          "sparsekernels/ops/crossover.json"]
        assert tar.extractfile("bench/results/nvidia-h100/bsr_linear.csv").read().decode() == body


def test_targets_read_the_bench_rows(gc, tmp_path):
    folder = tmp_path / "nvidia-h100"
    folder.mkdir()
    eff = random.uniform(0.71, 0.99)
    (folder / "bsr_linear.csv").write_text(
        "# bsr_linear\nblock,density,efficiency,vs_torch_bsr,fwdbwd_speedup\n"
        f"64x64,0.5,{eff},2.0,\n64x64,0.3,0.8,0.9,1.4\n32x32,0.1,0.4,3.0,1.2\n64x64,1.0,0.1,1.5,\n")
    got = {t: (m, v) for t, m, v in gc.targets(tmp_path)}
    assert got["bsr_linear efficiency >= 0.7 at block 64, density <= 0.5"] == (
        f"{eff:.2f}, 0.80", "pass")
    assert got["bsr_linear efficiency >= 0.5 at block 32, density <= 0.5"] == ("0.40", "MISS")
    assert got["bsr_linear faster than torch.sparse BSR at every point (x)"][1] == "MISS"
    assert got["bsr_linear fwd+bwd faster than dense at density <= 0.3 (x)"] == (
        "1.40, 1.20", "pass")
    assert got["BERT-base kernel mode at 70% blocks: >= 1.5x dense"] == ("n/a", "n/a")


def test_arguments_are_checked_before_anything_runs(gc, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(["--only", "bench_nope"])
    assert exc.value.code == 2
    for bad in ("pytest", "pytest=abc", "nope=10", "demo=-1"):
        with pytest.raises(SystemExit):
            gc.parse_args(["--cap", bad])
    args = gc.parse_args(["--skip-build", "--only", "import,demo", "--cap", "demo=90"])
    assert args.skip == ["build"] and args.only == ["import", "demo"] and args.caps == {"demo": 90}
    steps = {phase.name: (argv, cap) for phase, argv, cap in gc.plan(args)}
    assert steps["pytest"][0] is None and steps["demo"][1] == 90 and steps["import"][0] is not None
    monkeypatch.setenv("GPU_CHECK_DRY_RUN", "1")
    dry = gc.plan(gc.parse_args([]))
    assert all("--write-crossover" not in (argv or ()) for _, argv, _ in dry)
    assert dict((p.name, argv) for p, argv, _ in dry)["build"] is None  # a dry run builds nothing
    monkeypatch.setenv("GPU_CHECK_DRY_RUN", "0")
    gpu = {p.name: (argv, cap) for p, argv, cap in gc.plan(gc.parse_args([]))}
    assert sum(cap for _, cap in gpu.values()) <= 470  # 8 minutes, build included, with margin
    assert "--write-crossover" in gpu["bench_bsr_linear"][0]
    assert all("--headline" in gpu[name][0] for name in gpu if name.startswith("bench_"))


def test_the_headline_lists_are_the_issues_points():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_attention
        import bench_bsr_linear
        import bench_ffn
    finally:
        sys.path.pop(0)
    import torch

    cuda = torch.device("cuda")
    lin = bench_bsr_linear.headline_cases(cuda, smoke=False)
    assert {(c.k, c.n) for c in lin} == {(768, 3072), (3072, 768)}
    assert {c.tokens for c in lin} == {8192} and {c.dtype for c in lin} == {"bfloat16"}
    assert {c.block for c in lin} == {(32, 32), (64, 64)}
    assert {c.density for c in lin if c.backward} == {0.5, 0.3, 0.1}
    ffn = bench_ffn.headline_cases(cuda, smoke=False)
    assert {(c.model, c.tokens, c.block, c.density, c.train) for c in ffn} == {
        ("bert-base", 8192, b, d, True) for b in (32, 64) for d in (0.5, 0.3, 0.1)}
    att = bench_attention.headline_cases(cuda, smoke=False)
    assert {(c.seq_len, c.layout, c.density, c.dtype, c.backward) for c in att} == {
        (4096, "random", d, "bfloat16", True) for d in (0.25, 1.0)}
    for module in (bench_bsr_linear, bench_ffn, bench_attention):  # the CPU form is small
        assert all(getattr(c, "tokens", getattr(c, "seq_len", 0)) <= 256
                   for c in module.headline_cases(torch.device("cpu"), smoke=True))


def test_targets_read_columns_the_benches_write(gc):
    """A renamed bench column would turn a target into n/a without a word: the columns
    targets() reads are in the rows the benches make (tiny CPU cases)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_attention
        import bench_bsr_linear
    finally:
        sys.path.pop(0)
    import torch

    from sparsekernels.ops.backend import Backend

    cpu = torch.device("cpu")
    lin = bench_bsr_linear.run_case(bench_bsr_linear.Case(128, 256, 33, 0.3, (32, 32), "float32",
                                                          backward=True),
                                    cpu, Backend.CPU, 1e11, 1e10, reps=1)
    assert {"block", "density", "efficiency", "vs_torch_bsr", "fwdbwd_speedup"} <= set(lin)
    assert lin["block"] == "32x32"
    att = bench_attention.run_case(bench_attention.Case(128, 1, "random", 0.25, heads=2,
                                                        backward=True),
                                   cpu, 1e11, 1e10, reps=1, flex=False)
    assert [r["pass"] for r in att] == ["fwd", "fwd+bwd"]
    for row in att:
        assert {"block_density", "speedup_vs_dense", "speedup_vs_flex"} <= set(row)


@pytest.mark.parametrize("status, dry_run, packed", [("ok", False, True), ("timeout", False, False),
                                                     ("ok", True, False)],
                         ids=["measured", "stopped", "dry-run"])
def test_the_crossover_is_packed_only_when_this_run_measured_it(gc, tmp_path, status, dry_run,
                                                                 packed):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "results" / "nvidia-h200").mkdir(parents=True)
    (work / "results" / "nvidia-h200" / "ffn.csv").write_text(f"a\n{random.random()}\n")
    out.mkdir()
    results = [gc.PhaseResult("bench_bsr_linear", status, 1.0, 55.0)]
    gc.finalize(out, results, work, dry_run, ["--only", "bench_bsr_linear"])
    with tarfile.open(out / gc.TARBALL) as tar:
        names = tar.getnames()
    assert "bench/results/nvidia-h200/ffn.csv" in names
    assert ("sparsekernels/ops/crossover.json" in names) == packed
    summary = json.loads((out / gc.SUMMARY_JSON).read_text())
    assert summary["phases"][0]["status"] == status and summary["mode"] == (
        "dry-run" if dry_run else "gpu")
