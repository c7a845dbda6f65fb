"""When an op may run its implementation directly instead of through torch's dispatcher.

A custom op's Python dispatch (torch.library) costs several microseconds a call: at decode,
where a 30-layer model makes over 200 calls per token, that is as much as the kernels. An
eager call that needs no gradient runs the very same implementation without it; anything
that must see the op (torch.compile, a torch function or dispatch mode such as FakeTensor or
a profiler's, a tensor subclass, autograd) goes through the dispatcher as before.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _mode_stacks() -> int:
    return torch._C._len_torch_function_stack() + torch._C._len_torch_dispatch_stack()


# private torch functions; without them every call takes the dispatcher
_MODE_STACKS = (_mode_stacks if hasattr(torch._C, "_len_torch_function_stack")
                and hasattr(torch._C, "_len_torch_dispatch_stack") else (lambda: 1))


def plain_inference(*tensors: Optional[Tensor]) -> bool:
    """True when a call on `tensors` may skip the dispatcher: eager, no active torch function
    or dispatch mode, plain tensors, and no gradient needed (grad mode off, or nothing
    requires one)."""
    if torch.compiler.is_compiling() or _MODE_STACKS():  # dynamo cannot trace the second
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True


def eager_or_op(impl, op, x: Tensor, *args):
    """impl(x, *args), an op's implementation, when the call may skip the dispatcher (see
    plain_inference), else the op itself."""
    if plain_inference(x, *(a for a in args if isinstance(a, Tensor))):
        return impl(x, *args)
    return op(x, *args)


# a Parameter runs ops as a plain tensor (no torch function of its own); other subclasses
# (BlockSparseTensor, FakeTensor, DTensor, ...) must see the op
_PLAIN = (Tensor, torch.nn.Parameter)
