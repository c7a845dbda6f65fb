"""Products with BlockSparseTensor weights: the functional forms of SparseLinear / SparseFFN.

    y = sparse_linear(x, W, bias)                 # x @ W.T + bias, W a BlockSparseTensor
    y = sparse_ffn(x, W1, b1, W2, b2, "gelu")     # act(x @ W1.T + b1) @ W2.T + b2
    y = sparse_gated_ffn(x, Wg, Wu, Wd)           # (silu(x @ Wg.T) * (x @ Wu.T)) @ Wd.T

`F.linear(x, W)` with a BlockSparseTensor W calls sparse_linear. The router
(sparsekernels.ops.router) picks the kernel, or plain dense torch above the measured density
crossover; the ops (torch.ops.sparsekernels.bsr_linear / bsr_ffn / bsr_gated_ffn) take the
blocks and index as plain tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsekernels.formats.block_sparse import BlockSparseTensor, inner_tensors
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.bsr_ffn import activate, check_activation
from sparsekernels.ops.router import route


def check_linear_inputs(x: Tensor, weight, bias: Optional[Tensor]) -> None:
    if not isinstance(weight, BlockSparseTensor):
        raise TypeError(f"sparse_linear needs a BlockSparseTensor weight, got "
                        f"{type(weight).__name__}: build one with "
                        "BlockSparseTensor.from_dense(weight, block_size)")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"wrong input width: the weight expects [..., {k}] inputs, got "
                         f"{list(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"dtype mismatch: input is {x.dtype}, weight is {weight.dtype}; cast one "
                        "of them (e.g. module.to(dtype) or x.to(weight.dtype))")
    if x.device != weight.device:
        raise ValueError(f"device mismatch: input on {x.device}, weight on {weight.device}; "
                         "move the module or the input with .to(device)")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape [{n}], got {list(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}; expected {x.dtype} on "
                            f"{x.device}")


def _dense_route(weight: BlockSparseTensor, backend: Backend) -> bool:
    return route("bsr_linear", weight.device, weight.dtype, backend,
                 block_size=weight.block_size, density=weight.density).dense


def sparse_linear(x: Tensor, weight: BlockSparseTensor, bias: Optional[Tensor] = None,
                  backend: "Backend | str" = "auto") -> Tensor:
    """x[..., K] @ weight.T + bias for a BlockSparseTensor weight [N, K].

    backend: auto (default; may run plain dense above the density crossover), cpu, cuda,
    triton or reference. SPARSEKERNELS_BACKEND overrides auto.
    """
    check_linear_inputs(x, weight, bias)
    backend = Backend.parse(backend)
    if _dense_route(weight, backend):
        return torch.nn.functional.linear(x, weight.to_dense(), bias)
    return torch.ops.sparsekernels.bsr_linear(x, *inner_tensors(weight), bias, backend.value)


def check_ffn_inputs(x: Tensor, w1, b1: Optional[Tensor], w2, b2: Optional[Tensor],
                     activation: str) -> None:
    check_activation(activation)
    check_linear_inputs(x, w1, b1)
    hidden = w1.shape[0]
    if not isinstance(w2, BlockSparseTensor):
        raise TypeError(f"sparse_ffn needs BlockSparseTensor weights, got {type(w2).__name__} "
                        "for w2: build one with BlockSparseTensor.from_dense(weight, block_size)")
    if w2.shape[1] != hidden:
        raise ValueError(f"w2 reads {w2.shape[1]} features but w1 produces {hidden}: w2 must "
                         f"be the FFN's second layer, shaped [out, {hidden}]")
    check_linear_inputs(x.new_empty(0, hidden), w2, b2)


def sparse_ffn(x: Tensor, w1: BlockSparseTensor, b1: Optional[Tensor], w2: BlockSparseTensor,
               b2: Optional[Tensor], activation: str = "gelu",
               backend: "Backend | str" = "auto") -> Tensor:
    """act(x[..., K] @ w1.T + b1) @ w2.T + b2 for BlockSparseTensor weights w1 [N1, K] and
    w2 [N2, N1]; activation: none, gelu (erf), gelu_tanh, relu or silu.

    auto runs the fused kernel when both weights are sparse enough for their kernels, and
    otherwise each layer as sparse_linear would (dense above the measured crossover).
    """
    check_ffn_inputs(x, w1, b1, w2, b2, activation)
    backend = Backend.parse(backend)
    if _dense_route(w1, backend) or _dense_route(w2, backend):
        h = activate(sparse_linear(x, w1, b1, backend), activation)
        return sparse_linear(h, w2, b2, backend)
    return torch.ops.sparsekernels.bsr_ffn(x, *inner_tensors(w1), b1, *inner_tensors(w2), b2,
                                           activation, backend.value)


def check_gated_ffn_inputs(x: Tensor, gate, up, down, gate_bias: Optional[Tensor],
                           up_bias: Optional[Tensor], down_bias: Optional[Tensor],
                           activation: str) -> None:
    check_activation(activation)
    check_linear_inputs(x, gate, gate_bias)
    check_linear_inputs(x, up, up_bias)
    if tuple(up.shape) != tuple(gate.shape) or up.block_size != gate.block_size:
        raise ValueError(f"gate {list(gate.shape)} in {gate.block_size} blocks and up "
                         f"{list(up.shape)} in {up.block_size} blocks must have one shape and "
                         "one block size")
    hidden = gate.shape[0]
    if not isinstance(down, BlockSparseTensor):
        raise TypeError(f"sparse_gated_ffn needs BlockSparseTensor weights, got "
                        f"{type(down).__name__} for down: build one with "
                        "BlockSparseTensor.from_dense(weight, block_size)")
    if down.shape[1] != hidden:
        raise ValueError(f"down reads {down.shape[1]} features but gate and up produce {hidden}: "
                         f"down must be shaped [out, {hidden}]")
    check_linear_inputs(x.new_empty(0, hidden), down, down_bias)


def sparse_gated_ffn(x: Tensor, gate: BlockSparseTensor, up: BlockSparseTensor,
                     down: BlockSparseTensor, gate_bias: Optional[Tensor] = None,
                     up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None,
                     activation: str = "silu", backend: "Backend | str" = "auto") -> Tensor:
    """(act(x @ gate.T + gate_bias) * (x @ up.T + up_bias)) @ down.T + down_bias for
    BlockSparseTensor weights gate, up [N1, K] (one block size) and down [N2, N1]; biases
    optional; activation: silu (SwiGLU), gelu_tanh (GeGLU), gelu, relu or none.

    auto runs the fused kernel when all three weights are sparse enough for their kernels,
    and otherwise each layer as sparse_linear would (dense above the measured crossover).
    """
    check_gated_ffn_inputs(x, gate, up, down, gate_bias, up_bias, down_bias, activation)
    backend = Backend.parse(backend)
    if any(_dense_route(w, backend) for w in (gate, up, down)):
        h = (activate(sparse_linear(x, gate, gate_bias, backend), activation)
             * sparse_linear(x, up, up_bias, backend))
        return sparse_linear(h, down, down_bias, backend)
    return torch.ops.sparsekernels.bsr_gated_ffn(
        x, *inner_tensors(gate), gate_bias, *inner_tensors(up), up_bias, *inner_tensors(down),
        down_bias, activation, backend.value)
