"""The Triton backend of sparsekernels::bsr_linear (and bsr_dsd / bsr_sdd) against the
float64 reference.

CPU cases run the kernels in the Triton interpreter and need TRITON_INTERPRET=1 in the
environment before Triton is imported (`TRITON_INTERPRET=1 pytest tests/ops`); they are
skipped otherwise. `gpu` cases run the Triton and CUDA backends on BERT-sized shapes.

Accuracy rule: the kernel's max error against float64 is at most twice the error of the
same product computed by torch in the same dtype, plus a few (4) ulps of the output's
magnitude: with one token and one stored block the max is taken over a few dozen errors,
and there the ratio alone is noisy (up to 2x + 2.8 ulps over 600 seeds in fp32).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from sparsekernels.formats.block_sparse import BlockSparseTensor, topk_block_mask
from sparsekernels.formats.functional import sparse_linear
from sparsekernels.ops.backend import Backend, available, triton_available, triton_interpret
from sparsekernels.ops.reference import bsr_linear as ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BLOCKS = {"b16x16": (16, 16), "b32x64": (32, 64), "b64x32": (64, 32)}
DENSITIES = {"d0": 0.0, "d0.05": 0.05, "d0.5": 0.5, "d1": 1.0}
TOKENS = {"T0": (0,), "T1": (1,), "T97": (97,), "3d": (3, 33)}
N_OUT, K_IN = 128, 192  # tiny: the interpreter runs a program at a time


# --- helpers ---------------------------------------------------------------------------
def _kernels():
    return importlib.import_module("sparsekernels.ops.triton.bsr_linear")


@pytest.fixture
def interp():
    """The Triton module, on CPU tensors through the interpreter."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if not triton_interpret():
        pytest.skip("Triton kernels on CPU need the interpreter: run with TRITON_INTERPRET=1")
    return _kernels()


def _weight(n, k, block_size, density, dtype, device="cpu", empty_row=False, empty_col=False):
    dense = torch.randn(n, k, device=device)
    mask = topk_block_mask(dense, block_size, 1.0 - density)
    if empty_row:
        mask[0] = False
    if empty_col:
        mask[:, -1] = False
    return BlockSparseTensor.from_dense(dense.to(dtype), block_size, mask)


def _with_grad(w: BlockSparseTensor) -> BlockSparseTensor:
    values = w.values.detach().clone().requires_grad_()
    return BlockSparseTensor.from_parts(values, w.index(), w.shape)


SLACK_ULPS = 4


def assert_close_to_reference(out, ref64, torch_out, what=""):
    """max|out - ref| <= 2 max|torch_out - ref| + SLACK_ULPS ulps at the reference's
    magnitude."""
    assert out.shape == ref64.shape, f"{what}: shape {list(out.shape)} != {list(ref64.shape)}"
    assert out.dtype == torch_out.dtype, f"{what}: dtype {out.dtype} != {torch_out.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    torch_err = (torch_out.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if out.numel() else 0.0)
    slack = SLACK_ULPS * torch.finfo(out.dtype).eps * scale
    assert err <= 2.0 * torch_err + slack, (
        f"{what}: kernel error {err:.3e} > 2 x torch error {torch_err:.3e} + {slack:.1e}")


def _check_linear_and_grads(x, w, bias, backend):
    """Forward and both gradients (through autograd) against float64, with torch's own
    same-dtype error as the yardstick."""
    x = x.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_() if bias is not None else None
    wg = _with_grad(w)
    y = sparse_linear(x, wg, bias, backend=backend)
    g = torch.randn_like(y)
    y.backward(g)

    dense64 = w.to_dense().double()
    x64, g64 = x.detach().double(), g.double()
    b64 = bias.detach().double() if bias is not None else None
    y64 = F.linear(x64, dense64, b64)
    dense = w.to_dense()
    y_torch = F.linear(x.detach(), dense, bias.detach() if bias is not None else None)
    assert_close_to_reference(y, y64, y_torch, "forward")

    assert_close_to_reference(x.grad, g64 @ dense64, g @ dense, "input gradient")

    g2, x2 = g.reshape(-1, g.shape[-1]), x.detach().reshape(-1, x.shape[-1])
    bs = w.block_size
    sdd64 = ref.bsr_sdd(g2.double(), x2.double(), w.row_indices, w.col_indices, bs)
    sdd_torch = ref.bsr_sdd(g2, x2, w.row_indices, w.col_indices, bs)
    assert_close_to_reference(wg.values.grad, sdd64, sdd_torch, "weight gradient")
    if bias is not None:
        assert bias.grad is not None and bias.grad.shape == bias.shape


# --- CPU, through the interpreter ------------------------------------------------------
@pytest.mark.parametrize("tokens", TOKENS.values(), ids=TOKENS.keys())
@pytest.mark.parametrize("density", DENSITIES.values(), ids=DENSITIES.keys())
@pytest.mark.parametrize("block_size", BLOCKS.values(), ids=BLOCKS.keys())
def test_fp32_public_op_and_autograd(interp, block_size, density, tokens):
    w = _weight(N_OUT, K_IN, block_size, density, torch.float32)
    x = torch.randn(*tokens, K_IN)
    _check_linear_and_grads(x, w, torch.randn(N_OUT), "triton")


@pytest.mark.parametrize("block_size", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_public_op_and_autograd(interp, dtype, block_size):
    # bf16 runs with fp32 tiles in the interpreter (its tl.dot misreads bf16, see
    # _upcast_dot); loads, stores and casts still go through bf16
    w = _weight(N_OUT, K_IN, block_size, 0.5, dtype, empty_row=True)
    x = torch.randn(3, 33, K_IN, dtype=dtype)
    _check_linear_and_grads(x, w, torch.randn(N_OUT, dtype=dtype), "triton")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_empty_block_rows_and_columns(interp, dtype):
    # block row 0 and block column -1 hold nothing: their outputs are exactly bias / zero
    w = _weight(N_OUT, K_IN, (16, 32), 0.5, dtype, empty_row=True, empty_col=True)
    x = torch.randn(97, K_IN, dtype=dtype)
    bias = torch.randn(N_OUT, dtype=dtype)
    y = interp.forward(x, w.values, w.crow_indices, w.col_indices, bias)
    assert torch.equal(y[:, :16], bias[:16].expand(97, 16))
    g = torch.randn(97, N_OUT, dtype=dtype)
    dx = interp.bsr_dsd(g, w.values, w.ccol_indices, w.row_indices_t, w.transpose_perm)
    assert torch.equal(dx[:, -32:], torch.zeros(97, 32, dtype=dtype))
    _check_linear_and_grads(x, w, bias, "triton")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_nnz_zero_writes_bias_or_zeros(interp, with_bias):
    w = _weight(N_OUT, K_IN, (32, 64), 0.0, torch.float32)
    assert w.nnz_blocks == 0
    x = torch.randn(5, K_IN)
    bias = torch.randn(N_OUT) if with_bias else None
    y = interp.forward(x, w.values, w.crow_indices, w.col_indices, bias)
    expected = bias.expand(5, N_OUT) if with_bias else torch.zeros(5, N_OUT)
    assert torch.equal(y, expected)
    dx = interp.bsr_dsd(torch.randn(5, N_OUT), w.values, w.ccol_indices, w.row_indices_t,
                        w.transpose_perm)
    assert torch.equal(dx, torch.zeros(5, K_IN))
    dw = interp.bsr_sdd(torch.randn(5, N_OUT), x, w.row_indices, w.col_indices, 32, 64)
    assert dw.shape == (0, 32, 64)


def test_zero_tokens(interp):
    w = _weight(N_OUT, K_IN, (16, 16), 0.5, torch.float32)
    x = torch.randn(0, K_IN)
    assert interp.forward(x, w.values, w.crow_indices, w.col_indices, None).shape == (0, N_OUT)
    assert interp.bsr_dsd(torch.randn(0, N_OUT), w.values, w.ccol_indices, w.row_indices_t,
                          w.transpose_perm).shape == (0, K_IN)
    dw = interp.bsr_sdd(torch.randn(0, N_OUT), x, w.row_indices, w.col_indices, 16, 16)
    assert torch.equal(dw, torch.zeros(w.nnz_blocks, 16, 16))


_EPILOGUES = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
              "relu": F.relu, "none": lambda h: h}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", list(_EPILOGUES))
def test_fused_activation_epilogue(interp, dtype, with_bias, activation):
    w = _weight(N_OUT, K_IN, (32, 64), 0.5, dtype)
    x = torch.randn(97, K_IN, dtype=dtype)
    bias = torch.randn(N_OUT, dtype=dtype) if with_bias else None
    act = _EPILOGUES[activation]
    y = interp.forward(x, w.values, w.crow_indices, w.col_indices, bias, activation=activation)
    y64 = act(F.linear(x.double(), w.to_dense().double(), bias.double() if with_bias else None))
    y_torch = act(F.linear(x, w.to_dense(), bias))
    assert_close_to_reference(y, y64, y_torch, f"bias+{activation}")
    with pytest.raises(ValueError, match="activation"):
        interp.forward(x, w.values, w.crow_indices, w.col_indices, bias, activation="relu6")


@pytest.mark.parametrize("block_size", BLOCKS.values(), ids=BLOCKS.keys())
def test_direct_calls_strided_rows_and_split_t(interp, block_size):
    """Module functions called directly: x with a row stride wider than K, and the weight
    gradient reduced over several token splits."""
    w = _weight(N_OUT, K_IN, block_size, 0.5, torch.float32)
    wide = torch.randn(97, K_IN + 40)
    x = wide[:, 7:7 + K_IN]  # row stride K + 40, unit column stride
    assert x.stride() == (K_IN + 40, 1)
    y = interp.forward(x, w.values, w.crow_indices, w.col_indices, None)
    dense, dense64 = w.to_dense(), w.to_dense().double()
    assert_close_to_reference(y, x.double() @ dense64.T, x @ dense.T, "strided forward")

    g = torch.randn(197, N_OUT)
    x2 = torch.randn(197, K_IN)
    sdd64 = ref.bsr_sdd(g.double(), x2.double(), w.row_indices, w.col_indices, block_size)
    sdd_torch = ref.bsr_sdd(g, x2, w.row_indices, w.col_indices, block_size)
    for split in (1, 3):
        dw = interp.bsr_sdd(g, x2, w.row_indices, w.col_indices, *block_size, split_t=split)
        assert_close_to_reference(dw, sdd64, sdd_torch, f"sdd split_t={split}")


def _opcheck_all(w, x, bias, backend):
    """torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch) of
    the three ops on the given backend."""
    ops = torch.ops.sparsekernels
    vals = w.values.detach().clone().requires_grad_()
    xg = x.detach().clone().requires_grad_()
    torch.library.opcheck(ops.bsr_linear.default,
                          (xg, vals, w.crow_indices, w.col_indices, w.row_indices,
                           w.ccol_indices, w.row_indices_t, w.transpose_perm, bias, backend))
    g = torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    torch.library.opcheck(ops.bsr_dsd.default, (g, w.values, w.ccol_indices, w.row_indices_t,
                                                w.transpose_perm, backend))
    torch.library.opcheck(ops.bsr_sdd.default, (g, x, w.row_indices, w.col_indices,
                                                *w.block_size, backend))


def test_opcheck(interp):
    w = _weight(64, 96, (16, 32), 0.5, torch.float32)
    _opcheck_all(w, torch.randn(2, 5, 96), torch.randn(64, requires_grad=True), "triton")


def test_launcher_rejects_bad_inputs(interp):
    w = _weight(N_OUT, K_IN, (16, 16), 0.5, torch.float32)
    x = torch.randn(4, K_IN)
    with pytest.raises(TypeError, match="int32"):
        interp.forward(x, w.values, w.crow_indices.long(), w.col_indices, None)
    with pytest.raises(TypeError, match="float16"):
        interp.forward(x.half(), w.values, w.crow_indices, w.col_indices, None)
    with pytest.raises(ValueError, match="bias"):
        interp.forward(x, w.values, w.crow_indices, w.col_indices, torch.randn(N_OUT + 1))
    with pytest.raises(ValueError, match="same T"):
        interp.bsr_sdd(torch.randn(3, N_OUT), x, w.row_indices, w.col_indices, 16, 16)


# --- GPU -------------------------------------------------------------------------------
GPU_SHAPES = {"bert-ffn-up": (3072, 768), "bert-ffn-down": (768, 3072)}
GPU_BLOCKS = {"b32x32": (32, 32), "b64x64": (64, 64), "b16x128": (16, 128)}


def _gpu_backend_or_skip(backend: str):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = available(Backend(backend), torch.device("cuda"), "bsr_linear")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.slow  # every (shape, block, dtype) autotunes the Triton kernels afresh
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0], ids=["d0", "d0.1", "d1"])
@pytest.mark.parametrize("block_size", GPU_BLOCKS.values(), ids=GPU_BLOCKS.keys())
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_gpu_bert_shapes(backend, dtype, density, block_size, shape):
    _gpu_backend_or_skip(backend)
    n, k = shape
    w = _weight(n, k, block_size, density, dtype, device="cuda", empty_row=True)
    x = torch.randn(4, 257, k, dtype=dtype, device="cuda")  # ragged token count
    _check_linear_and_grads(x, w, torch.randn(n, dtype=dtype, device="cuda"), backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("tokens", [(0,), (1,), (97,), (1025,), (2, 300)],
                         ids=["T0", "T1", "T97", "T1025", "3d"])
def test_gpu_ragged_tokens(backend, dtype, tokens):
    _gpu_backend_or_skip(backend)
    w = _weight(1024, 512, (32, 64), 0.3, dtype, device="cuda", empty_row=True, empty_col=True)
    x = torch.randn(*tokens, 512, dtype=dtype, device="cuda")
    _check_linear_and_grads(x, w, torch.randn(1024, dtype=dtype, device="cuda"), backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_opcheck(backend):
    _gpu_backend_or_skip(backend)
    w = _weight(256, 384, (32, 64), 0.5, torch.float16, device="cuda")
    x = torch.randn(3, 50, 384, dtype=torch.float16, device="cuda")
    _opcheck_all(w, x, torch.randn(256, dtype=torch.float16, device="cuda"), backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gpu_triton_fused_gelu_and_split_t(dtype):
    _gpu_backend_or_skip("triton")
    kernels = _kernels()
    w = _weight(3072, 768, (32, 32), 0.2, dtype, device="cuda")
    x = torch.randn(1000, 768, dtype=dtype, device="cuda")
    bias = torch.randn(3072, dtype=dtype, device="cuda")
    y = kernels.forward(x, w.values, w.crow_indices, w.col_indices, bias, activation="gelu")
    dense = w.to_dense()
    assert_close_to_reference(y, F.gelu(F.linear(x.double(), dense.double(), bias.double())),
                              F.gelu(F.linear(x, dense, bias)), "bias+gelu")
    g = torch.randn(1000, 3072, dtype=dtype, device="cuda")
    sdd64 = ref.bsr_sdd(g.double(), x.double(), w.row_indices, w.col_indices, (32, 32))
    sdd_torch = ref.bsr_sdd(g, x, w.row_indices, w.col_indices, (32, 32))
    for split in (None, 1, 7):
        dw = kernels.bsr_sdd(g, x, w.row_indices, w.col_indices, 32, 32, split_t=split)
        assert_close_to_reference(dw, sdd64, sdd_torch, f"sdd split_t={split}")
