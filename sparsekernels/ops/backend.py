"""The backends an op can run on, and whether one is available here (installed and built).

Which one runs is decided by sparsekernels.ops.router; this module only answers "can it run
at all, and if not, what would make it available".
"""

from __future__ import annotations

import enum
import importlib.util
import os

import torch

from sparsekernels.ops import _ext

ENV_BACKEND = "SPARSEKERNELS_BACKEND"


class Backend(str, enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"  # C++/CUDA extension (csrc/cuda)
    TRITON = "triton"  # Triton kernels (ops/triton); on CPU only under TRITON_INTERPRET=1
    CPU = "cpu"  # C++ extension (csrc/cpu)
    REFERENCE = "reference"  # pure torch, any device and dtype, the test oracle

    @classmethod
    def parse(cls, value: "Backend | str | None") -> "Backend":
        if value is None:
            return cls.AUTO
        if isinstance(value, Backend):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(b.value for b in cls)
            raise ValueError(f"unknown backend {value!r}: expected one of {names}") from None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    # find_spec does not import triton: `import sparsekernels` must stay free of it
    return importlib.util.find_spec("triton") is not None


def available(backend: Backend, device: torch.device, op: str) -> str | None:
    """None when `backend` can run `op` on `device`, else the reason and the fix."""
    if backend is Backend.REFERENCE:
        return None
    if backend is Backend.CPU:
        if device.type != "cpu":
            return f"backend 'cpu' runs tensors on the CPU, got {device}; use 'auto'"
        if not _ext.has_op(op, "cpu"):
            return _ext.missing_message(op, "cpu")
        return None
    if backend is Backend.CUDA:
        if device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors, got {device}; use 'auto'"
        if not _ext.has_op(op, "cuda"):
            return _ext.missing_message(op, "cuda")
        return None
    if backend is Backend.TRITON:
        if not triton_available():
            return "backend 'triton' needs triton: pip install triton"
        if device.type == "cpu" and not triton_interpret():
            return ("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton "
                    "interpreter, for tests); use 'cpu' or 'auto' for speed")
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' does not support device {device}"
        return None
    raise AssertionError(backend)
