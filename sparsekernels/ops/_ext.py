"""The compiled extension `sparsekernels._C`, loaded on first use and never at import.

Each C++/CUDA source registers its kernels into the `sparsekernels_C` op namespace with
TORCH_LIBRARY_FRAGMENT, so a kernel is available when `torch.ops.sparsekernels_C.<name>`
has an implementation for the device. Only sparsekernels.ops calls into it.
"""

from __future__ import annotations

import functools
import importlib

NAMESPACE = "sparsekernels_C"

_BUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` (or `make build`) from the "
    "repository root"
)


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """Import the extension; None on success, else why it is missing."""
    try:
        importlib.import_module("sparsekernels._C")
        return None
    except ImportError as exc:
        return f"the compiled extension sparsekernels._C is not importable ({exc})"


@functools.lru_cache(maxsize=None)  # the extension, once loaded, never changes
def has_op(name: str, device_type: str) -> bool:
    """True when the extension has a `device_type` kernel for `sparsekernels_C::<name>`."""
    if load() is not None:
        return False
    import torch

    qualified = f"{NAMESPACE}::{name}_{device_type}"
    return torch._C._dispatch_has_kernel(qualified) if hasattr(
        torch._C, "_dispatch_has_kernel") else hasattr(
        getattr(torch.ops, NAMESPACE), f"{name}_{device_type}")


@functools.lru_cache(maxsize=None)
def op(name: str, device_type: str):
    """The compiled kernel `sparsekernels_C::<name>_<device_type>`."""
    import torch

    reason = load()
    if reason is not None:
        raise RuntimeError(f"sparsekernels: {reason}; {_BUILD_HINT}")
    return getattr(getattr(torch.ops, NAMESPACE), f"{name}_{device_type}")


def missing_message(name: str, device_type: str) -> str:
    reason = load()
    if reason is not None:
        return f"backend '{device_type}' needs the compiled extension: {reason}; {_BUILD_HINT}"
    if device_type == "cuda":
        return (f"the extension was built without CUDA kernels ({name}): rebuild on a machine "
                "with a CUDA build of torch and nvcc, without SPARSEKERNELS_SKIP_CUDA_BUILD=1")
    return f"the extension has no {device_type} kernel for {name}; rebuild it: {_BUILD_HINT}"


@functools.lru_cache(maxsize=None)
def direct(name: str):
    """A direct entry of the extension module (`sparsekernels._C.<name>`, called without the
    op dispatcher), or None when the extension or the entry is missing."""
    if load() is not None:
        return None
    import sys

    return getattr(sys.modules["sparsekernels._C"], name, None)
