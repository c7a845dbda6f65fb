"""Which implementation runs an op: chosen per call from the device and what is available.

`auto` prefers the fastest available kernel for the tensors' device; an explicit choice that
cannot run raises with the command that would make it available.
"""

from __future__ import annotations

import enum
import functools
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


def requested_backend(backend: "Backend | str | None") -> Backend:
    """The caller's choice, overridden by SPARSEKERNELS_BACKEND when the caller said auto."""
    chosen = Backend.parse(backend)
    if chosen is Backend.AUTO and os.environ.get(ENV_BACKEND):
        chosen = Backend.parse(os.environ[ENV_BACKEND])
    return chosen


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


def select(backend: "Backend | str | None", device: torch.device, op: str,
           preference: dict[str, tuple[Backend, ...]] | None = None) -> Backend:
    """Resolve `auto` (and the environment override) to a concrete backend for `op`."""
    chosen = requested_backend(backend)
    if chosen is not Backend.AUTO:
        reason = available(chosen, device, op)
        if reason is not None:
            raise RuntimeError(f"sparsekernels.{op}: {reason}")
        return chosen
    if preference is None:
        return _auto(device.type, op)
    order = preference.get(device.type) or _DEFAULT_ORDER.get(device.type, ())
    return _first_available(order, device, op)


def _first_available(order, device: torch.device, op: str) -> Backend:
    for candidate in order:
        if available(candidate, device, op) is None:
            return candidate
    return Backend.REFERENCE


@functools.lru_cache(maxsize=None)
def _auto(device_type: str, op: str) -> Backend:
    """auto's default choice: what is installed and built does not change within a process,
    so it is resolved once per device type and op (every layer call asks)."""
    return _first_available(_DEFAULT_ORDER.get(device_type, ()), torch.device(device_type), op)


# auto's order of preference per device type; the reference backend is the last resort
_DEFAULT_ORDER: dict[str, tuple[Backend, ...]] = {
    "cuda": (Backend.TRITON, Backend.CUDA),
    "cpu": (Backend.CPU,),
}
