"""Giving a module another forward without changing its class, parameters or state_dict, and
taking it back: the module keeps what the new forward needs under one attribute of its
__dict__ and a bound method shadows its class's forward (the original stays reachable as
type(module).forward). Used by the norm ops (nn.add_norm, nn.rms_norm)."""

from __future__ import annotations

import types
from typing import Callable

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
