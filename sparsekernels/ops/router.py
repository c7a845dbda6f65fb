"""Which implementation runs an op: decided here, and nowhere else.

    r = route("bsr_linear", device, dtype, backend="auto", block_size=(32, 32), density=0.3)
    r.backend     the implementation that runs (cpu, triton, cuda or reference)
    r.dense       auto chose plain dense torch (F.linear, SDPA) instead of a sparse kernel
    r.crossover   the block density above which auto runs dense
    r.reason      one line saying why

Each implementation states what it runs (`Impl`: devices, dtypes, head sizes, backward,
dropout) and, when a case is outside it, why (`Impl.why_not`). `route` checks the backend
the caller asked for (or SPARSEKERNELS_BACKEND, when the caller said auto), or picks the
first implementation that runs the case in auto's order for the device; auto also goes dense
above the crossover measured for the device, dtype and block size (ops/crossover.json).
The environment is read when a route is made: a caller keeps its Route (a SparseLinear makes
one when it is built, moved or loaded), so a route is a constant under torch.compile and
costs nothing per call. Routes are cached by their arguments.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from sparsekernels.ops.backend import ENV_BACKEND, Backend, available
from sparsekernels.ops.crossover import ENV_CROSSOVER, dense_crossover, sdpa_from_keys
from sparsekernels.ops.limits import CPU_HEAD_DIMS, CUDA_ATTENTION_HEAD_DIMS


@dataclass(frozen=True)
class Route:
    op: str
    backend: Backend
    dense: bool = False
    crossover: float = 1.0
    # block_sparse_attention: an all-true layout runs as dense SDPA
    dense_full_layout: bool = False
    reason: str = ""
    # bsr_linear on a dense route: calls with fewer rows than this still run the sparse
    # kernel (a layer that stores only blocks would first have to build its dense weight)
    sparse_below_rows: int = 0
    # block_sparse_attention with dense_full_layout: only from this many keys on (below it
    # the kernel outran SDPA on an all-true layout: ops/crossover.json, measured)
    dense_full_from: int = 0


@dataclass(frozen=True)
class Impl:
    """One implementation of one op and the cases it runs."""

    backend: Backend
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: Optional[tuple[torch.dtype, ...]] = None  # None: every floating dtype
    head_dims: Optional[tuple[int, ...]] = None  # attention: None means any
    backward: bool = True
    dropout: bool = True
    # an explicit request this implementation cannot run goes to this one when it can
    fallback: Optional[Backend] = None
    # the compiled kernel that must be built (ops._ext name), when it differs from the op's
    kernel: Optional[str] = None

    def why_not(self, op: str, device: torch.device, dtype: torch.dtype, *,
                head_dim: Optional[int] = None, dropout: bool = False,
                backward: bool = False) -> Optional[str]:
        """None when this implementation runs the case, else what it runs instead."""
        reason = available(self.backend, device, self.kernel or op)
        if reason is not None:
            return reason
        name = f"the {self.backend.value} kernel of {op}"
        if device.type not in self.devices and self.backend is not Backend.REFERENCE:
            return f"{name} runs {' and '.join(self.devices)} tensors, got {device}"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"{name} runs {', '.join(str(d) for d in self.dtypes)}, got {dtype}"
        if self.head_dims is not None and head_dim is not None and head_dim not in self.head_dims:
            return f"{name} runs head dims {self.head_dims}, got {head_dim}"
        if dropout and not self.dropout:
            return f"{name} has no dropout"
        if backward and not self.backward:
            return f"{name} has no backward"
        return None


_HALF = (torch.float32, torch.float16, torch.bfloat16)
IMPLEMENTATIONS: dict[str, tuple[Impl, ...]] = {
    "bsr_linear": (
        Impl(Backend.CPU, ("cpu",)),
        Impl(Backend.TRITON),
        Impl(Backend.CUDA, ("cuda",)),
        Impl(Backend.REFERENCE),
    ),
    "bsr_ffn": (
        Impl(Backend.CPU, ("cpu",)),
        Impl(Backend.TRITON, kernel="bsr_linear"),
        Impl(Backend.CUDA, ("cuda",), kernel="bsr_linear"),
        Impl(Backend.REFERENCE),
    ),
    "bsr_gated_ffn": (
        Impl(Backend.CPU, ("cpu",)),
        Impl(Backend.TRITON, kernel="bsr_linear"),
        Impl(Backend.CUDA, ("cuda",), kernel="bsr_linear"),
        Impl(Backend.REFERENCE),
    ),
    # int8 weights: a CPU kernel (weight-only or int8 x int8, see ops.precision), else torch
    "bsr_linear_int8": (
        Impl(Backend.CPU, ("cpu",)),
        Impl(Backend.REFERENCE),
    ),
    "bsr_ffn_int8": (
        Impl(Backend.CPU, ("cpu",)),
        Impl(Backend.REFERENCE),
    ),
    "bsr_gated_ffn_int8": (
        Impl(Backend.CPU, ("cpu",)),
        Impl(Backend.REFERENCE),
    ),
    "block_sparse_attention": (
        Impl(Backend.CPU, ("cpu",), head_dims=CPU_HEAD_DIMS, dropout=False),
        Impl(Backend.TRITON),
        Impl(Backend.CUDA, ("cuda",), dtypes=_HALF, head_dims=CUDA_ATTENTION_HEAD_DIMS,
             backward=False, dropout=False, fallback=Backend.TRITON),
        Impl(Backend.REFERENCE),
    ),
}
# auto's order per device type; the reference is the last resort everywhere
AUTO_ORDER: dict[str, tuple[Backend, ...]] = {
    "cuda": (Backend.TRITON, Backend.CUDA),
    "cpu": (Backend.CPU,),
}
# attention with at most this many queries is decode (a KV cache read once per call): auto
# runs the kernel even for an all-true layout, which reads each key/value block once for its
# whole group of query heads (dense SDPA repeats them per query head)
DECODE_MAX_QUERIES = 16
# a Linear called on at most this many rows is decode: memory-bound, the weight read once
CPU_DECODE_ROWS = 16
# a dense Linear (an LM head, a layer left unpruned) on the CPU: our decode GEMV (the weight
# streamed once by the dot path, csrc/cpu/dense_decode.cpp) outruns torch's up to this many
# rows per dtype (bench_dense_decode); torch's above, and for other dtypes
DENSE_DECODE_ROWS = {torch.float32: CPU_DECODE_ROWS, torch.bfloat16: 4}


def dense_decode_rows(device: torch.device, dtype: torch.dtype) -> int:
    """Rows up to which a dense Linear with weights on `device` in `dtype` runs our decode
    GEMV; 0: always torch's (another device, or SPARSEKERNELS_BACKEND asks for another
    implementation than the CPU kernels)."""
    if torch.device(device).type != "cpu" or requested("auto") not in (Backend.AUTO, Backend.CPU):
        return 0
    return DENSE_DECODE_ROWS.get(dtype, 0)


def _impl(op: str, backend: Backend) -> Impl:
    for impl in IMPLEMENTATIONS[op]:
        if impl.backend is backend:
            return impl
    raise AssertionError((op, backend))


def requested(backend: "Backend | str | None") -> Backend:
    """The caller's choice, or SPARSEKERNELS_BACKEND when the caller said auto."""
    chosen = Backend.parse(backend)
    if chosen is Backend.AUTO and os.environ.get(ENV_BACKEND):
        chosen = Backend.parse(os.environ[ENV_BACKEND])
    return chosen


def route(op: str, device: torch.device, dtype: torch.dtype, backend: "Backend | str" = "auto",
          *, block_size: Optional[tuple[int, int]] = None, density: Optional[float] = None,
          head_dim: Optional[int] = None, dropout: bool = False,
          backward: bool = False) -> Route:
    """The implementation that runs `op` for this case (see the module docstring).

    block_size and density (block-sparse weights) decide auto's dense route; head_dim,
    dropout and backward select among attention kernels. Raises when the requested backend
    cannot run the case and has no fallback, naming what it runs and the way out."""
    device = torch.device(device)
    # dynamo traces through the cache wrapper (and warns): it gets the function itself
    find = _route.__wrapped__ if torch.compiler.is_compiling() else _route
    return find(op, device.type, device.index, dtype, requested(backend),
                  tuple(block_size) if block_size is not None else None,
                  None if density is None else float(density), head_dim, bool(dropout),
                  bool(backward), os.environ.get(ENV_CROSSOVER))


@functools.lru_cache(maxsize=4096)
def _route(op, device_type, device_index, dtype, chosen: Backend, block_size, density,
           head_dim, dropout, backward, _crossover_env) -> Route:
    device = torch.device(device_type, device_index)
    case = dict(head_dim=head_dim, dropout=dropout, backward=backward)
    extra = _op_fields(op, device, dtype, chosen, dropout)
    if chosen is not Backend.AUTO:
        impl = _impl(op, chosen)
        reason = impl.why_not(op, device, dtype, **case)
        if reason is None:
            return Route(op, chosen, reason=f"{chosen.value} requested", **extra)
        fallback = impl.fallback
        if fallback is not None and _impl(op, fallback).why_not(op, device, dtype, **case) is None:
            return Route(op, fallback, reason=f"{chosen.value} requested; {reason}: "
                                              f"{fallback.value} runs it", **extra)
        if backward:
            return Route(op, Backend.REFERENCE, reason=f"{reason}: the reference runs it")
        raise RuntimeError(f"sparsekernels.{op}: {reason}; use backend='auto' or 'reference'")
    why = []
    for backend in AUTO_ORDER.get(device_type, ()):
        reason = _impl(op, backend).why_not(op, device, dtype, **case)
        if reason is None:
            return _auto_dense(Route(op, backend, reason=f"auto: {backend.value}", **extra),
                               device_type, dtype, block_size, density)
        why.append(reason)
    reason = "; ".join(why) or f"no sparse kernel for {device_type}"
    # the reference densifies anyway: for a weight op, dense torch is the same math, faster
    dense = op in ("bsr_linear", "bsr_ffn", "bsr_gated_ffn") and block_size is not None
    if extra.get("dense_full_layout"):  # no kernel to win below the crossover: SDPA always
        extra["dense_full_from"] = 0
    return Route(op, Backend.REFERENCE, dense=dense, crossover=0.0 if dense else 1.0,
                 reason=f"auto: reference ({reason})", **extra)


def _op_fields(op: str, device: torch.device, dtype, chosen: Backend, dropout: bool) -> dict:
    if op == "block_sparse_attention":
        # auto on the CPU runs an all-true layout as dense SDPA (faster there; on a GPU,
        # checking the layout would cost a sync), except the float64 reference: the oracle
        oracle = dtype == torch.float64 and available(Backend.CPU, device, op) is not None
        full = chosen is Backend.AUTO and device.type == "cpu" and not dropout and not oracle
        return {"dense_full_layout": full,
                "dense_full_from": sdpa_from_keys(device.type, dtype) if full else 0}
    return {}


def _auto_dense(r: Route, device_type: str, dtype, block_size, density) -> Route:
    weight_op = r.op in ("bsr_linear", "bsr_ffn", "bsr_gated_ffn")
    if not weight_op or block_size is None or density is None:
        return r
    crossover = dense_crossover(device_type, dtype, block_size)
    dense = density >= crossover
    reason = (f"auto: dense F.linear (block density {density:.2f} >= crossover {crossover:.2f})"
              if dense else f"{r.reason} (block density {density:.2f} < crossover {crossover:.2f})")
    # at decode the CPU kernel streams the stored blocks once and outruns a dense GEMV at any
    # density (bench_decode_linear), and building the dense weight per call costs more still
    below = CPU_DECODE_ROWS + 1 if dense and device_type == "cpu" and r.op == "bsr_linear" else 0
    return Route(r.op, r.backend, dense, crossover, r.dense_full_layout, reason,
                 below)


def clear_cache() -> None:
    """Forget every route (after the extension or the crossover table changed in-process)."""
    _route.cache_clear()
