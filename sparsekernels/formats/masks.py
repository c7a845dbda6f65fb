"""NNI's mask format: ``{module_name: {"weight": mask, "bias": mask}}`` of 0/1 tensors.

One job: check, count, save and load mask dicts. Masks are float 0/1 tensors with the
shape of the parameter they mask, on its device. On disk they are one safetensors file
with flat keys ``"<module_name>.<param_name>"`` (never a pickle).
"""

from __future__ import annotations

import os
from typing import Dict

import torch
from safetensors.torch import load_file, save_file

Masks = Dict[str, Dict[str, torch.Tensor]]


class MaskError(ValueError):
    """A mask dict does not fit the model it is applied to."""


def validate_masks(model: torch.nn.Module, masks: Masks) -> None:
    """Raise :class:`MaskError` unless every mask names a parameter of ``model`` with the
    same shape and holds only 0s and 1s."""
    modules = dict(model.named_modules())
    for name, entry in masks.items():
        if name not in modules:
            raise MaskError(f"mask for {name!r}: the model has no such module; masks must be "
                            "keyed by names from model.named_modules()")
        module = modules[name]
        for pname, mask in entry.items():
            param = getattr(module, pname, None)
            if not isinstance(param, torch.Tensor):
                raise MaskError(f"mask for {name!r}.{pname}: {type(module).__name__} has no "
                                f"parameter {pname!r}")
            if tuple(mask.shape) != tuple(param.shape):
                raise MaskError(f"mask for {name!r}.{pname} has shape {tuple(mask.shape)} but "
                                f"the parameter has shape {tuple(param.shape)}")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise MaskError(f"mask for {name!r}.{pname} holds values other than 0 and 1")


def flatten_masks(masks: Masks) -> dict[str, torch.Tensor]:
    """``{"mod": {"weight": m}}`` -> ``{"mod.weight": m}`` (contiguous CPU copies)."""
    return {f"{name}.{pname}": m.detach().to("cpu").contiguous()
            for name, entry in masks.items() for pname, m in entry.items()}


def unflatten_masks(flat: dict[str, torch.Tensor]) -> Masks:
    masks: Masks = {}
    for key, value in flat.items():
        name, _, pname = key.rpartition(".")
        masks.setdefault(name, {})[pname] = value
    return masks


def save_masks(masks: Masks, path: str | os.PathLike) -> None:
    """Write masks to a safetensors file with keys ``"<module>.<param>"``."""
    save_file(flatten_masks(masks), os.fspath(path))


def load_masks_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> Masks:
    """Read masks written by :func:`save_masks`."""
    return unflatten_masks(load_file(os.fspath(path), device=str(device)))


def masks_to(masks: Masks, model: torch.nn.Module) -> Masks:
    """Move each mask to its parameter's device and dtype-neutral float32."""
    modules = dict(model.named_modules())
    return {name: {p: m.to(device=getattr(modules[name], p).device, dtype=torch.float32)
                   for p, m in entry.items()} for name, entry in masks.items()}


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of zeros in one mask."""
    return 1.0 - float(mask.sum()) / mask.numel() if mask.numel() else 0.0


def total_sparsity(masks: Masks, param: str = "weight") -> float:
    """Fraction of zeros over all ``param`` masks together."""
    zeros = sum(int((e[param] == 0).sum()) for e in masks.values() if param in e)
    count = sum(e[param].numel() for e in masks.values() if param in e)
    return zeros / count if count else 0.0


def merge_masks(a: Masks, b: Masks) -> Masks:
    """Element-wise product of two mask dicts (a parameter pruned in either is pruned)."""
    out: Masks = {n: dict(e) for n, e in a.items()}
    for name, entry in b.items():
        for pname, m in entry.items():
            cur = out.setdefault(name, {}).get(pname)
            out[name][pname] = m if cur is None else cur * m
    return out
