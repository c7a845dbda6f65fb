"""The two CPU paths of the low-precision and norm kernels, for an `isa` fixture: the AVX-512
one where the CPU has the feature it needs, and the portable one everywhere
(SPARSEKERNELS_CPU_ISA=generic)."""

import pytest

from sparsekernels.ops import _ext
from sparsekernels.ops.precision import cpu_isa

PATHS = ["native", "generic"]


def use_isa(path: str, monkeypatch, op: str | None = None, feature: str | None = None) -> str:
    """Select `path` for this test; skip when the CPU op `op` is not built, or when the native
    path needs `feature` (as cpu_isa() names it) and this CPU lacks it."""
    if op is not None and not _ext.has_op(op, "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")
    if path == "generic":
        monkeypatch.setenv("SPARSEKERNELS_CPU_ISA", "generic")
    elif feature is not None and feature not in cpu_isa():
        pytest.skip(f"this CPU has no {feature} (the generic case covers it)")
    return path
