"""The bench suite's --smoke mode runs (CI): each script as a real command, in seconds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


SCRIPTS = ["bench_bsr_linear.py", "bench_ffn.py", "bench_models.py", "bench_attention.py",
           "bench_pack_cache.py", "bench_call_overhead.py", "bench_lowp.py", "bench_lowp_models.py",
           "bench_ffn_bf16.py", "bench_ffn_int8.py", "bench_dense_decode.py",
           "bench_decode_linear.py", "bench_oneshot.py", "bench_generate.py",
           "bench_block_energy.py", "bench_attention_full.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke(script):
    path = BENCH / script
    if not path.exists():
        pytest.fail(f"{path} is missing")
    env = dict(os.environ, TRITON_INTERPRET="0")  # smoke runs time real kernels
    # the checkout under test, not whichever sparsekernels the venv points at
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH.parent), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip(), "a smoke run prints its rows"
