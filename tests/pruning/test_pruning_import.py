"""Importing sparsekernels.pruning stays light: no transformers, no Triton, no CUDA."""

import subprocess
import sys


def test_import_is_light():
    code = ("import sys, sparsekernels.pruning, torch; "
            "bad = [m for m in ('transformers', 'triton', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad; assert not torch.cuda.is_initialized()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
