"""Giving a module another forward without changing its class, parameters or state_dict, and
taking it back: the module keeps what the new forward needs under one attribute of its
__dict__ and a bound method shadows its class's forward (the original stays reachable as
type(module).forward). Used by the fused gated MLPs (nn.sparse_ffn) and the norm ops
(nn.add_norm, nn.rms_norm).

Before a swap, a probe checks that the new forward computes what the module's own does:
random_copy gives it a copy with random weights (a model being loaded does not hold its
values yet when its structure record is replayed, and the answer must not depend on them),
agrees compares the two outputs.
"""

from __future__ import annotations

import copy
import itertools
import types
from typing import Callable, Optional

import torch
from torch import nn


def swap_forward(module: nn.Module, attr: str, state, forward: Callable) -> None:
    module.__dict__[attr] = state
    module.forward = types.MethodType(forward, module)


def swapped(module: nn.Module, attr: str) -> bool:
    return attr in module.__dict__


def restore_forwards(model: nn.Module, attr: str) -> int:
    """Every module of `model` swapped under `attr` gets its class's forward back; how many."""
    count = 0
    for module in model.modules():
        if attr in module.__dict__:
            del module.__dict__[attr], module.__dict__["forward"]
            count += 1
    return count


def swap_checked(model: nn.Module, sites, attr: str, forward: Callable,
                 check: Callable, done: str, already: str, names=None) -> dict[str, str]:
    """Swap `forward` in under `attr` for the sites (named in `names`, default all) that
    pass `check(site, module)` -> the new forward's state, or a string saying why not. Every
    site is checked before any module changes. Returns {site name: done, already or why}."""
    report, plan = {}, []
    for site in sites:
        if names is not None and site.name not in names:
            continue
        module = model.get_submodule(site.name)
        if swapped(module, attr):
            report[site.name] = already
            continue
        state = check(site, module)
        if isinstance(state, str):
            report[site.name] = state
            continue
        plan.append((site.name, module, state))
    for name, module, state in plan:  # every check passed: change the modules
        swap_forward(module, attr, state, forward)
        report[name] = done
    return report


def random_copy(module: nn.Module) -> Optional[nn.Module]:
    """A copy of `module` in eval mode whose floating parameters and buffers are random
    normal; None when they hold no storage (meta tensors)."""
    probe = copy.deepcopy(module)
    try:
        with torch.no_grad():
            for t in itertools.chain(probe.parameters(), probe.buffers()):
                if t.is_floating_point():
                    t.normal_()
    except Exception:
        return None
    return probe.eval()


def agrees(got, want, tol: float) -> bool:
    """`got` is a tensor of `want`'s shape and dtype within tol * max |want| of it."""
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
            and want.shape == got.shape and want.dtype == got.dtype):
        return False
    return bool((got.float() - want.float()).abs().max()
                <= tol * want.float().abs().max().clamp_min(1e-6))
