"""Run a model under masks with its parameter names unchanged.

One job: attach and detach masks. :func:`apply_masks_` multiplies each masked parameter
by its mask in place right away, again before every forward of its module whenever the
parameter changed since (an optimizer step), and masks its gradient, so the model keeps
``model.state_dict()`` keys, optimizers and ``named_parameters`` as they were.
:meth:`MaskHandle.remove` detaches the hooks; pruned values stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsekernels.formats.masks import Masks, masks_to, validate_masks


@dataclass
class MaskHandle:
    """What :func:`apply_masks_` attached; ``remove()`` detaches it."""

    masks: Masks
    _handles: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def apply_masks_(model: torch.nn.Module, masks: Masks) -> MaskHandle:
    """Mask ``model`` in place (see module docstring). Validates before changing anything.

    A parameter shared by several modules (tied embeddings) gets the product of its
    masks, applied once per change, so re-masking never happens between two uses of the
    parameter within one forward (which would break autograd's saved tensors).
    """
    validate_masks(model, masks)
    masks = masks_to(masks, model)
    handle = MaskHandle(masks)
    modules = dict(model.named_modules())
    combined: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    for name, entry in masks.items():
        for pname, mask in entry.items():
            param = getattr(modules[name], pname)
            prev = combined.get(id(param))
            combined[id(param)] = (param, mask if prev is None else prev[1] * mask)
    seen: dict[int, int] = {}

    def mask_now(keys):
        with torch.no_grad():
            for key in keys:
                param, mask = combined[key]
                if seen.get(key) != param._version:
                    param.mul_(mask.to(param.dtype))
                    seen[key] = param._version

    mask_now(list(combined))
    for name, entry in masks.items():
        module = modules[name]
        keys = [id(getattr(module, p)) for p in entry]
        handle._handles.append(module.register_forward_pre_hook(
            lambda mod, args, keys=keys: mask_now(keys)))
    for param, mask in combined.values():
        if param.requires_grad:
            handle._handles.append(param.register_hook(
                lambda grad, mask=mask: grad * mask.to(grad.dtype)))
    return handle
