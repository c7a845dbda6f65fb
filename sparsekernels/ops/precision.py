"""Which precision and which low-precision kernel a block-sparse layer runs.

dtype (what a user asks sparsify_ / ModelSpeedup for): torch.float32, torch.bfloat16, or
torch.int8 / "int8" (int8 weights with per-output-channel scales; activations stay in the
model's float dtype at the layer's boundary).

`int8_scheme` is the one place that decides which int8 kernel runs a call; the bf16 kernels
need no decision here: bsr_linear / bsr_ffn run bf16 on AVX-512 BF16 when the CPU has it and
convert to fp32 otherwise, inside the C++ entry points (`cpu_isa()` says which).
"""

from __future__ import annotations

import functools

import torch

INT8 = "int8"
# Few rows (decode) are memory-bound: the weight-only kernel reads the int8 weights once and
# keeps the activations exact; from here on the int8 x int8 kernel's arithmetic rate wins.
W8_MAX_ROWS = 16
INT8_SCHEMES = ("auto", "w8", "w8a8")


def parse_dtype(dtype) -> "torch.dtype | str":
    """torch.float32, torch.bfloat16 or "int8" from what a user may write."""
    if dtype is None:
        return torch.float32
    if dtype in (torch.int8, INT8, "qint8", torch.qint8):
        return INT8
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(name, dtype)
    if dtype in (torch.float32, torch.bfloat16):
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}: use torch.float32, torch.bfloat16 or "
                     "torch.int8 (\"int8\")")


def int8_scheme(rows: int, requested: str = "auto") -> str:
    """The int8 kernel for a call with `rows` tokens: "w8" (weight-only: float activations,
    int8 weights) up to W8_MAX_ROWS rows, "w8a8" (dynamic per-token int8 activations) above;
    an explicit request wins."""
    if requested not in INT8_SCHEMES:
        raise ValueError(f"unknown int8 scheme {requested!r}: expected one of "
                         f"{', '.join(INT8_SCHEMES)}")
    if requested != "auto":
        return requested
    return "w8" if rows <= W8_MAX_ROWS else "w8a8"


@functools.lru_cache(maxsize=1)
def _isa() -> str:
    from sparsekernels.ops import _ext

    if not _ext.has_op("lowp_isa", "cpu"):
        return "unavailable (extension not built)"
    return _ext.op("lowp_isa", "cpu")()


def cpu_isa() -> str:
    """The low-precision paths this CPU runs: "avx512_bf16,avx512_vnni", ... or "generic"
    (SPARSEKERNELS_CPU_ISA=generic forces the portable paths)."""
    import os

    if os.environ.get("SPARSEKERNELS_CPU_ISA"):
        _isa.cache_clear()
    return _isa()
