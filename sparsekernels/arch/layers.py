"""The layers pruners understand, and where their output and input channels live.

One job: give every supported module a *canonical* weight view ``[out, in, *kernel]``.
``nn.Linear`` and ``nn.Conv2d`` store that already; transformers' ``Conv1D`` (GPT-2)
stores ``[in, out]`` and ``nn.Embedding`` stores ``[vocab, dim]`` (its output feature is
``dim``), so both are transposed. Granularities and dependency groups talk about the
canonical view only; :func:`from_canonical` turns a mask back into the stored layout.
"""

from __future__ import annotations

import torch

WEIGHT_TYPES = ("Linear", "Conv1D", "Conv2d", "Conv1d", "Embedding")
DEFAULT_WEIGHT_TYPES = ("Linear", "Conv1D", "Conv2d", "Conv1d")
NORM_TYPES = ("LayerNorm", "BatchNorm1d", "BatchNorm2d", "T5LayerNorm", "RMSNorm")
_TRANSPOSED = ("Conv1D", "Embedding")


# subclasses (BART's scaled and positional embeddings, MultiheadAttention's out_proj)
# behave as their base class: classify them by it
_BASE_KINDS = tuple((cls, cls.__name__) for cls in (
    torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.LayerNorm,
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()))


def type_name(module: torch.nn.Module) -> str:
    """The layer kind: the class name for known layers, else the torch base class's name."""
    name = type(module).__name__
    if name in WEIGHT_TYPES or name in NORM_TYPES:
        return name
    for base, kind in _BASE_KINDS:
        if isinstance(module, base):
            return kind
    return name


def is_transposed(module: torch.nn.Module) -> bool:
    """True when the stored weight is ``[in, out]`` (Conv1D) or ``[vocab, dim]``."""
    return type_name(module) in _TRANSPOSED


def to_canonical(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in the stored layout -> ``[out, in, *kernel]``."""
    return tensor.t() if is_transposed(module) else tensor


def from_canonical(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_canonical` (contiguous)."""
    return (tensor.t() if is_transposed(module) else tensor).contiguous()


def canonical_shape(module: torch.nn.Module) -> tuple[int, ...]:
    shape = tuple(module.weight.shape)
    return (shape[1], shape[0]) if is_transposed(module) else shape


def out_features(module: torch.nn.Module) -> int:
    return canonical_shape(module)[0]


def in_features(module: torch.nn.Module) -> int:
    return canonical_shape(module)[1]


def has_bias(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)
