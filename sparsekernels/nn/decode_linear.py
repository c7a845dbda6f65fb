"""DecodeLinear: an nn.Linear whose few-row eager calls on the CPU run sparsekernels' decode
GEMV, and decode_linears_ / undo_decode_linears_ to turn a model's dense Linears into it.

At decode (1 to 16 rows) a dense Linear is memory-bound: its time is the weight's bytes over
the bandwidth. torch's GEMV reaches a fraction of it on some CPUs, on one thread, which for a
pruned LLM makes the dense LM head (tied to the embedding, never pruned) a third of a decode
step. A DecodeLinear keeps its parameters, state_dict and tying (only its class changes) and
runs calls of at most ops.router.dense_decode_rows rows that need no gradient on the
extension's entry (ops.dense_decode); every other call is torch's F.linear, as before.
ModelSpeedup's kernel and auto modes apply it to the Linears they leave dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels.ops.dense_decode import direct_dense_linear
from sparsekernels.ops.eager import _MODE_STACKS
from sparsekernels.ops.router import dense_decode_rows


class DecodeLinear(nn.Linear):
    """nn.Linear with the decode GEMV for few-row calls (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.__dict__.get("_decode_rows", 0)
        if (rows and type(x) is torch.Tensor and x.numel() <= rows * self.in_features
                and not torch.compiler.is_compiling() and not _MODE_STACKS()):
            params = self._parameters
            weight, bias = params["weight"], params["bias"]
            if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
                    bias is not None and bias.requires_grad))):
                direct = direct_dense_linear()
                if direct is not None:
                    y = direct(x, weight, bias, rows)
                    if y is not None:
                        return y
        return F.linear(x, self.weight, self.bias)

    def reroute(self) -> int:
        """Ask the router again (done when the layer is made and when it moves or casts)."""
        self._decode_rows = dense_decode_rows(self.weight.device, self.weight.dtype)
        return self._decode_rows

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.reroute()
        return result


def decode_linears_(model: nn.Module, names=None) -> list[str]:
    """Make each plain nn.Linear of `model` (those named in `names`, default all) a
    DecodeLinear, in place; returns their names. Subclasses of nn.Linear are left alone (their
    forward is their own)."""
    done = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and (names is None or name in names):
            module.__class__ = DecodeLinear
            module.reroute()
            done.append(name)
    return done


def undo_decode_linears_(model: nn.Module) -> int:
    """DecodeLinear back to nn.Linear; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is DecodeLinear:
            module.__class__ = nn.Linear
            module.__dict__.pop("_decode_rows", None)
            count += 1
    return count
