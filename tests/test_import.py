"""`import sparsekernels` is cheap and safe: no CUDA init, no Triton, no compiled extension."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, torch\n"
        "import sparsekernels, sparsekernels.ops, sparsekernels.nn, sparsekernels.formats\n"
        "from sparsekernels import BlockSparseTensor, SparseLinear, sparsify_\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'sparsekernels._C' not in sys.modules, 'extension imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_reference_runs_without_extension():
    # with the extension hidden, auto falls back to the reference and stays correct
    code = (
        "import sys; sys.modules['sparsekernels._C'] = None\n"
        "import torch, sparsekernels as sk\n"
        "from sparsekernels.ops import _ext\n"
        "lin = torch.nn.Linear(64, 64)\n"
        "sl = sk.SparseLinear.from_linear(lin, (32, 32), sparsity=0.5)\n"
        "x = torch.randn(3, 64)\n"
        "torch.testing.assert_close(sl(x), sl.to_linear()(x))\n"
        "assert _ext.load() is not None\n"
        "try:\n"
        "    sk.sparse_linear(x, sl.weight.detach(), backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install -e . --no-build-isolation' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected a build hint')\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
