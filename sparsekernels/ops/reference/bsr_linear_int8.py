"""Reference int8 block-sparse Linear: the quantization rules and the oracle for the int8
kernels (pure torch, float64 sums).

Weights: symmetric, one scale per output channel over its stored blocks,
    scale[n] = max|w[n, :]| / 127,   q = round(w / scale[n]) in [-127, 127].
Activations (w8a8): one affine code per row (token), computed at run time, over the row's
range including zero, [lo, hi] = [min(x_t, 0), max(x_t, 0)]:
    s[t] = (hi - lo) / 255,  z[t] = round(-lo * 255 / (hi - lo)),
    u8 = clamp(round(x * 255 / (hi - lo)) + z[t], 0, 255),   x ~ s[t] * (u8 - z[t]),
in float32 with round-half-to-even, exactly as the kernels compute it (the kernels take the
unsigned codes and subtract z[t] * sum_k w[n, k]).
Outputs: w8   y = (x @ q.T) * scale + bias
         w8a8 y = ((u8 - z) @ q.T) * s[t] * scale + bias   (the integer sums are exact)
"""

from __future__ import annotations

import torch

from sparsekernels.ops.reference.bsr_linear import bsr_to_dense

QMAX = 127  # weights: symmetric int8
CODES = 255  # activations: unsigned codes 0..255 with a zero point


def quantize_blocks(values: torch.Tensor, row_indices: torch.Tensor, n_block_rows: int):
    """Stored blocks [nnz, bm, bk] (any float dtype) -> (int8 blocks, float32 scales [N])."""
    nnz, bm, _ = values.shape
    v = values.detach().double()
    amax = v.new_zeros(n_block_rows, bm)
    if nnz:
        index = row_indices.long()[:, None].expand(nnz, bm)
        amax.scatter_reduce_(0, index, v.abs().amax(dim=2), "amax")
    scale = (amax / QMAX).float()
    per_block = scale.double()[row_indices.long()] if nnz else v.new_zeros(0, bm)
    safe = torch.where(per_block > 0, per_block, torch.ones_like(per_block))
    q = torch.round(v / safe[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.reshape(-1)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, row_indices: torch.Tensor,
                      dtype=torch.float32) -> torch.Tensor:
    """int8 blocks and per-channel scales -> the blocks they stand for, in `dtype`."""
    bm = q.shape[1]
    per_block = scale.double().reshape(-1, bm)[row_indices.long()]
    return (q.double() * per_block[..., None]).to(dtype)


def quantize_rows(x: torch.Tensor):
    """Rows [T, K] -> (codes minus zero point, as float32 in [-255, 255], float32 scales [T]);
    float32 math, bit for bit what the kernels compute."""
    xf = x.float()
    zero = xf.new_zeros(xf.shape[:-1])
    lo = torch.minimum(xf.amin(dim=-1), zero) if xf.shape[-1] else zero
    hi = torch.maximum(xf.amax(dim=-1), zero) if xf.shape[-1] else zero
    rng = hi - lo
    # tensor / tensor: ATen divides a tensor by a Python number through its reciprocal
    full = torch.full_like(rng, float(CODES))
    scale = rng / full
    inv = torch.where(rng > 0, full / torch.where(rng > 0, rng, full), torch.zeros_like(rng))
    z = torch.round(-lo * inv)
    codes = (torch.round(xf * inv[..., None]) + z[..., None]).clamp_(0, CODES)
    return codes - z[..., None], scale


def bsr_linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    row_indices: torch.Tensor, col_indices: torch.Tensor, out_features: int,
                    bias: torch.Tensor | None, scheme: str) -> torch.Tensor:
    """x[T, K] through the quantized layer, in float64 (cast it to the dtype you need)."""
    w = bsr_to_dense(q.double(), row_indices, col_indices, (out_features, x.shape[-1]))
    if scheme == "w8a8":
        codes, xs = quantize_rows(x)
        y = (codes.double() @ w.T) * xs.double()[:, None] * scale.double()[None, :]
    elif scheme == "w8":
        y = (x.double() @ w.T) * scale.double()[None, :]
    else:
        raise ValueError(f"unknown int8 scheme {scheme!r}: expected w8 or w8a8")
    return y + bias.double() if bias is not None else y
