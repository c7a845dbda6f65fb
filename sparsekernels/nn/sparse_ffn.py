"""Fused block-sparse feed-forward blocks: SparseFFN, and fuse_ffn_ for transformers models.

An FFN is fc2(act(fc1(x))). With both layers SparseLinear it runs as one
sparsekernels.ops.bsr_ffn call (on the CPU, without writing the [tokens, 4 x hidden]
intermediate); when either layer is too dense for its kernel, each layer runs as its own
SparseLinear would (dense above the crossover).

fuse_ffn_(model) does this for every FFN the model map finds (sparsekernels.arch), after
ModelSpeedup's kernel or auto mode, without changing module names or the state_dict: the FFN's first SparseLinear becomes
a `FusedFFNInput` that computes the whole block, the activation an identity, and the second
SparseLinear a `FusedFFNOutput` that passes its input through (its parameters stay where
they were; the first layer reads them). unfuse_ffn_ undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sparsekernels.nn.sparse_linear import SparseLinear, _needs_grad
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.bsr_ffn import activate, check_activation


def ffn_forward(fc1: SparseLinear, fc2: SparseLinear, activation: str, x: torch.Tensor):
    """fc2(act(fc1(x))): fused when both layers run their kernels, else layer by layer."""
    if fc1.route.dense or fc2.route.dense:
        return SparseLinear.forward(fc2, activate(SparseLinear.forward(fc1, x), activation))
    fc1.check_input(x)  # fc2 and the activation were checked when the pair was made
    if (fc1.route.backend is Backend.CPU and fc2.route.backend is Backend.CPU
            and not (_needs_grad(x, fc1) or _needs_grad(x, fc2))):
        packed1, packed2 = fc1.packed(), fc2.packed()
        if packed1 is not None and packed2 is not None:  # the W.T blocks, as stored
            return torch.ops.sparsekernels.bsr_ffn_packed(
                x, fc1.values, packed1, fc1.crow_indices, fc1.col_indices, fc1.bias,
                fc2.values, packed2, fc2.crow_indices, fc2.col_indices, fc2.bias, activation)
    return torch.ops.sparsekernels.bsr_ffn(x, *fc1.op_args(), fc1.bias, *fc2.op_args(), fc2.bias,
                                           activation, fc1.backend.value)


def _check_pair(fc1, fc2, activation: str) -> None:
    for name, layer in (("fc1", fc1), ("fc2", fc2)):
        if not isinstance(layer, SparseLinear):
            raise TypeError(f"{name} must be a SparseLinear, got {type(layer).__name__}: convert "
                            "it with SparseLinear.from_linear(linear, block_size, sparsity=...)")
    if fc2.in_features != fc1.out_features:
        raise ValueError(f"fc2 reads {fc2.in_features} features but fc1 produces "
                         f"{fc1.out_features}: pass the FFN's two layers in order")
    if fc1.backend != fc2.backend:
        raise ValueError(f"fc1 and fc2 have different backends ({fc1.backend.value}, "
                         f"{fc2.backend.value}) but the fused op runs both with one: give both "
                         "the same backend")
    check_activation(activation)


class SparseFFN(nn.Module):
    """fc2(activation(fc1(x))) with two SparseLinear layers, run as one fused op."""

    def __init__(self, fc1: SparseLinear, fc2: SparseLinear, activation: str = "gelu"):
        super().__init__()
        _check_pair(fc1, fc2, activation)
        self.fc1, self.fc2, self.activation = fc1, fc2, activation

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, activation: str = "gelu",
                     block_size=(32, 32), sparsity: float | None = None,
                     backend: str = "auto") -> "SparseFFN":
        """Both layers to SparseLinear (see SparseLinear.from_linear), then fused."""
        check_activation(activation)  # before converting anything
        convert = lambda layer: layer if isinstance(layer, SparseLinear) else \
            SparseLinear.from_linear(layer, block_size, sparsity=sparsity, backend=backend)
        return cls(convert(fc1), convert(fc2), activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ffn_forward(self.fc1, self.fc2, self.activation, x)


# --- fusing inside transformers models -------------------------------------------------
class FusedFFNInput(SparseLinear):
    """The first layer of a fused FFN: computes fc2(act(fc1(x))) with the second layer's
    parameters (which stay registered where they were). In training with dropout between
    the activation and fc2 (BART, T5), it returns act(fc1(x)) and leaves fc2 to the second
    layer, so the model's own dropout runs where it should."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.__dict__["_ffn"]
        if self.training and state.dropout_p() > 0:
            return activate(SparseLinear.forward(self, x), state.activation)
        return ffn_forward(self, state.fc2, state.activation, x)


class FusedFFNOutput(SparseLinear):
    """The second layer of a fused FFN: passes the FFN's output through, or applies itself
    to an intermediate (the training-with-dropout route). fuse_ffn_ only fuses FFNs whose
    input and intermediate widths differ, so the width tells the two apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.out_features:
            return x
        return SparseLinear.forward(self, x)


@dataclass
class _Fused:
    """What fuse_ffn_ changed at one FFN, to run it and to undo it."""

    name: str
    fc2: SparseLinear
    activation: str
    act_slot: tuple  # (owner module, attribute) that held the activation
    act: object  # the model's activation module, replaced by an identity
    dropout_p: Callable[[], float]


def fuse_ffn_(model: nn.Module) -> dict[str, str]:
    """Fuse every FFN of `model` whose two layers are SparseLinear, in place.

    Returns {FFN module name: "fused (activation)" or why it was left as it is}. Module
    names and the state_dict do not change, so saving and loading work as before (a loaded
    model is fused again by calling this). Undo with unfuse_ffn_.
    """
    from sparsekernels.arch.find import activation_name, find_ffn

    report, plan = {}, []
    for site in find_ffn(model):
        if site.gated:
            report[site.name] = "left as is: a gated FFN (two first layers) has no fused kernel"
            continue
        if site.act is None:
            report[site.name] = "left as is: the model map found no activation module"
            continue
        act_slot = (model.get_submodule(site.act[0]), site.act[1])
        fc1, fc2, act = (model.get_submodule(site.up), model.get_submodule(site.down),
                         getattr(*act_slot))
        if isinstance(fc1, FusedFFNInput):
            report[site.name] = "already fused"
            continue
        if not (type(fc1) is SparseLinear and type(fc2) is SparseLinear):
            report[site.name] = (f"left as is: layers are {type(fc1).__name__} and "
                                 f"{type(fc2).__name__} (both must be SparseLinear)")
            continue
        if fc1.backend != fc2.backend:
            report[site.name] = (f"left as is: the layers' backends differ ({fc1.backend.value}, "
                                 f"{fc2.backend.value}); the fused op runs both with one")
            continue
        name = activation_name(act)
        if name is None:
            report[site.name] = f"left as is: activation {type(act).__name__} is not supported"
            continue
        if fc2.in_features != fc1.out_features or fc2.in_features == fc2.out_features:
            report[site.name] = ("left as is: the layers' widths do not chain, or the "
                                 "intermediate is as wide as the output")
            continue
        plan.append((site, act_slot, fc1, fc2, act, name))
    for site, act_slot, fc1, fc2, act, name in plan:  # every check passed: now mutate
        fc1.__dict__["_ffn"] = _Fused(site.name, fc2, name, act_slot, act,
                                      lambda site=site: site.dropout_p(model))
        fc1.__class__, fc2.__class__ = FusedFFNInput, FusedFFNOutput
        setattr(*act_slot, nn.Identity())
        report[site.name] = f"fused ({name})"
    return report


def unfuse_ffn_(model: nn.Module) -> int:
    """Undo fuse_ffn_: the layers become plain SparseLinear again. Returns how many FFNs."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, FusedFFNInput):
            state = module.__dict__.pop("_ffn")
            setattr(*state.act_slot, state.act)
            module.__class__, state.fc2.__class__ = SparseLinear, SparseLinear
            count += 1
    return count
