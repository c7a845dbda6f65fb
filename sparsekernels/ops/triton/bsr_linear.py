"""Triton kernels for sparsekernels::bsr_linear and its backward ops.

W is a block-sparse [N, K] matrix in BSR form (see sparsekernels.formats.block_sparse):
blocks of (bm, bk), `values[e, n, k]` row-major inside a block.

  bsr_linear(x, W) = x @ W.T + bias   _bsr_rowblock_kernel over block rows (crow/col index)
  bsr_dsd(g, W)    = g @ W            the same kernel over block columns (ccol/row_t index,
                                      blocks read through transpose_perm, untransposed)
  bsr_sdd(g, x)    = (g.T @ x)[stored] _bsr_sdd_kernel, one program per stored block (x T split)
  bsr_gated_linear = act(x @ Wg.T + bg) * (x @ Wu.T + bu)   the row-block kernel with a second
                                      weight (GATED): the gated FFN's first half, its
                                      activation-multiply in the epilogue

Both products of a dense matrix with the sparse one are "block-row products": output
column block r gathers, for every stored block p of its row in the index
(ptr[r] <= p < ptr[r+1]), an input tile x[:, idx[p]*BLOCK_IN:+BLOCK_IN] times the
block seen as [BLOCK_IN, BLOCK_OUT]. Forward: out = bm, in = bk, the block transposed
(strides 1, bk). Input gradient: out = bk, in = bm, the block as stored (strides bk, 1).

On GPU the launch configurations are autotuned per shape; under TRITON_INTERPRET=1 (the
CPU interpreter the tests use) a single small configuration runs, since autotuning in the
interpreter only costs time.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from sparsekernels.ops.backend import triton_interpret

ACTIVATIONS = (None, "none", "gelu", "gelu_tanh", "relu", "silu")  # as sparsekernels.ops.bsr_ffn
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SDD_SPLIT_QUANTUM = 32  # T per split is a multiple of this


# --- launch configurations -------------------------------------------------------------
def _rowblock_configs():
    if triton_interpret():
        return [triton.Config({"BLOCK_M": 32, "GROUP_M": 4}, num_warps=1, num_stages=1)]
    # (BLOCK_M, num_warps, num_stages): a short list, since every new shape tunes afresh
    # (16 and 32 only for small token counts: decode steps, see _prune_rowblock)
    shapes = ((16, 4, 3), (32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 2), (128, 4, 3),
              (128, 8, 3), (128, 8, 4))
    return [triton.Config({"BLOCK_M": m, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, w, s in shapes]


def _sdd_configs():
    if triton_interpret():
        return [triton.Config({"BLOCK_T": 32}, num_warps=1, num_stages=1)]
    shapes = ((32, 4, 3), (64, 4, 3), (64, 8, 4), (128, 8, 3))
    return [triton.Config({"BLOCK_T": t}, num_warps=w, num_stages=s) for t, w, s in shapes]


_SMEM_BUDGET = 200 * 1024  # bytes: leaves room below the 227 KiB of an H100 / H200 SM


def _prune_rowblock(configs, named_args, **kwargs):
    """Drop configurations whose pipelined tiles cannot fit in shared memory, and token
    tiles below 64 unless the token count is that small."""
    args = {**named_args, **kwargs}
    size = args["x_ptr"].element_size()
    block_out, block_in = args["BLOCK_OUT"], args["BLOCK_IN"]
    min_block_m = 16 if args["T_BUCKET"] <= 32 else 64
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] >= min_block_m
            and c.num_stages * size * block_in * (c.kwargs["BLOCK_M"] + block_out) <= _SMEM_BUDGET]
    return kept or configs[:1]


def _prune_sdd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    size = args["g_ptr"].element_size()
    block_out, block_in = args["BLOCK_OUT"], args["BLOCK_IN"]
    kept = [c for c in configs
            if c.num_stages * size * c.kwargs["BLOCK_T"] * (block_out + block_in) <= _SMEM_BUDGET]
    return kept or configs[:1]


def _t_bucket(t: int) -> int:
    """Autotuning key for the token count: powers of two, so ragged batches share a tuning."""
    return min(triton.next_power_of_2(max(int(t), 1)), 1 << 16)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's matmul precision setting (tf32 only when torch allows it),
    so the kernel is compared with torch at the same precision."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _upcast_dot(dtype: torch.dtype) -> bool:
    """The Triton interpreter's tl.dot multiplies bf16 tiles as their raw uint16 bits
    (triton 3.6 and 3.8, runtime/interpreter.py create_dot), so there the tiles are cast to fp32
    first: the same math, since a product of two bf16 values is exact in fp32. Compiled
    kernels always multiply bf16 on the tensor cores."""
    return dtype == torch.bfloat16 and triton_interpret()


# --- kernels ---------------------------------------------------------------------------
@triton.autotune(configs=_rowblock_configs(),
                 key=["T_BUCKET", "N_OUT", "IN_FEATURES", "BLOCK_OUT", "BLOCK_IN"],
                 prune_configs_by={"early_config_prune": _prune_rowblock})
@triton.jit
def _bsr_rowblock_kernel(
    # pointers
    x_ptr, w_ptr, out_ptr, bias_ptr, ptr_ptr, idx_ptr, perm_ptr,
    w2_ptr, bias2_ptr, ptr2_ptr, idx2_ptr,
    # sizes
    T, N_OUT, IN_FEATURES, T_BUCKET,
    # strides
    stride_xm, stride_om, stride_wb, stride_wo, stride_wi,
    # meta-parameters
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PERM: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[:, r*BLOCK_OUT:+BLOCK_OUT] = sum_p x[:, idx[p]*BLOCK_IN:+BLOCK_IN] @ Wp (+ bias),
    Wp[i, o] = w[blk, o, i] (element at blk*stride_wb + o*stride_wo + i*stride_wi),
    blk = perm[p] (or p), over the stored blocks ptr[r] <= p < ptr[r+1].
    GATED: act(that) * (the same product over w2 / ptr2 / idx2 (+ bias2)), the second weight
    laid out as the first (no perm)."""
    # 1-D grid in groups of GROUP_M token tiles, so the blocks of a row stay in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_r = N_OUT // BLOCK_OUT
    num_pid_in_group = GROUP_M * num_pid_r
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_r = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.arange(0, BLOCK_OUT)
    offs_i = tl.arange(0, BLOCK_IN)
    mask_m = offs_m < T
    x_row_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_i[None, :]
    w_tile_offs = offs_i[:, None] * stride_wi + offs_o[None, :] * stride_wo

    # int64 loop counter: block offsets p * stride_wb may pass 2**31
    start = tl.load(ptr_ptr + pid_r).to(tl.int64)
    end = tl.load(ptr_ptr + pid_r + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    for p in range(start, end):
        col = tl.load(idx_ptr + p).to(tl.int64)
        if HAS_PERM:
            blk = tl.load(perm_ptr + p).to(tl.int64)
        else:
            blk = p
        x = tl.load(x_row_ptrs + col * BLOCK_IN, mask=mask_m[:, None], other=0.0)
        w = tl.load(w_ptr + blk * stride_wb + w_tile_offs)
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    offs_n = pid_r.to(tl.int64) * BLOCK_OUT + offs_o
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    if GATED:  # the up projection, kept beside the gate's accumulator until the epilogue
        start2 = tl.load(ptr2_ptr + pid_r).to(tl.int64)
        end2 = tl.load(ptr2_ptr + pid_r + 1).to(tl.int64)
        acc2 = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
        for p in range(start2, end2):
            col = tl.load(idx2_ptr + p).to(tl.int64)
            x = tl.load(x_row_ptrs + col * BLOCK_IN, mask=mask_m[:, None], other=0.0)
            w = tl.load(w2_ptr + p * stride_wb + w_tile_offs)
            if UPCAST_DOT:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc2 = tl.dot(x, w, acc2, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc2 += tl.load(bias2_ptr + offs_n).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":  # exact (erf) GELU, as torch.nn.functional.gelu
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":  # 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi)(a + 0.044715 a^3)
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    elif ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == "silu":
        acc = acc * tl.sigmoid(acc)
    if GATED:
        acc = acc * acc2
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.autotune(configs=_sdd_configs(), key=["T_BUCKET", "BLOCK_OUT", "BLOCK_IN"],
                 prune_configs_by={"early_config_prune": _prune_sdd})
@triton.jit
def _bsr_sdd_kernel(
    # pointers
    g_ptr, x_ptr, out_ptr, row_ptr, col_ptr,
    # sizes
    T, T_PER_SPLIT, T_BUCKET,
    # strides
    stride_gm, stride_xm, stride_os, stride_ob,
    # meta-parameters
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[s, e] = g[ts, row_e*BLOCK_OUT:+BLOCK_OUT].T @ x[ts, col_e*BLOCK_IN:+BLOCK_IN]
    over the tokens ts of split s (T_PER_SPLIT of them)."""
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    row = tl.load(row_ptr + pid_e).to(tl.int64)
    col = tl.load(col_ptr + pid_e).to(tl.int64)
    offs_o = tl.arange(0, BLOCK_OUT)
    offs_i = tl.arange(0, BLOCK_IN)
    offs_t = tl.arange(0, BLOCK_T)
    # g is read transposed, as a [BLOCK_OUT, BLOCK_T] tile
    gt_ptrs = g_ptr + (row * BLOCK_OUT + offs_o)[:, None] + offs_t[None, :].to(tl.int64) * stride_gm
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xm + (col * BLOCK_IN + offs_i)[None, :]

    t_start = pid_s.to(tl.int64) * T_PER_SPLIT
    t_end = min(T, t_start + T_PER_SPLIT)
    acc = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    for t in range(t_start, t_end, BLOCK_T):
        mask_t = (t + offs_t) < t_end
        gt = tl.load(gt_ptrs + t * stride_gm, mask=mask_t[None, :], other=0.0)
        x = tl.load(x_ptrs + t * stride_xm, mask=mask_t[:, None], other=0.0)
        if UPCAST_DOT:
            gt = gt.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(gt, x, acc, input_precision=DOT_PRECISION)

    out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + pid_e.to(tl.int64) * stride_ob
                + offs_o[:, None] * BLOCK_IN + offs_i[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))


# --- launchers -------------------------------------------------------------------------
def _check_dense(name: str, t: torch.Tensor, width: int, device, dtype) -> torch.Tensor:
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"{name} must be [T, {width}], got {list(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dtype != dtype or t.device != device:
        raise TypeError(f"{name} is {t.dtype} on {t.device}; expected {dtype} on {device}")
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _check_index(name: str, t: torch.Tensor, length: int | None, device) -> torch.Tensor:
    if t.dim() != 1 or (length is not None and t.numel() != length):
        want = f"[{length}]" if length is not None else "1-D"
        raise ValueError(f"{name} must be {want}, got {list(t.shape)}")
    if t.dtype != torch.int32 or t.device != device:
        raise TypeError(f"{name} must be int32 on {device}, got {t.dtype} on {t.device}")
    return t.contiguous()


def _check_values(values: torch.Tensor, device) -> torch.Tensor:
    if values.dim() != 3:
        raise ValueError(f"values must be [nnz, bm, bk], got {list(values.shape)}")
    if values.device != device:
        raise ValueError(f"values are on {values.device}, the input on {device}")
    for b in values.shape[1:]:
        if b < 16 or b & (b - 1):
            raise ValueError("block sides must be powers of two >= 16, got "
                             f"{tuple(values.shape[1:])}")
    return values.contiguous()


def _launch_rowblock(x2, values, ptr, idx, perm, bias, out, block_out, block_in, transposed,
                     activation, up=None):
    """up: (values, ptr, idx, bias) of the gated kernel's second weight, or None."""
    t, n_out = out.shape
    if t == 0 or n_out == 0:
        return out
    stride_wo, stride_wi = (block_in, 1) if transposed else (1, block_out)

    def grid(meta):
        return (triton.cdiv(t, meta["BLOCK_M"]) * (n_out // block_out),)

    up_values, up_ptr, up_idx, up_bias = up if up is not None else (values, ptr, idx, bias)
    _bsr_rowblock_kernel[grid](
        x2, values, out, bias if bias is not None else out, ptr, idx,
        perm if perm is not None else idx,
        up_values, up_bias if up_bias is not None else out, up_ptr, up_idx,
        t, n_out, x2.shape[1], _t_bucket(t),
        x2.stride(0), out.stride(0), values.stride(0), stride_wo, stride_wi,
        BLOCK_OUT=block_out, BLOCK_IN=block_in, HAS_BIAS=bias is not None,
        HAS_PERM=perm is not None, ACTIVATION=activation or "none", GATED=up is not None,
        DOT_PRECISION=_dot_precision(x2.dtype), UPCAST_DOT=_upcast_dot(x2.dtype),
    )
    return out


def _check_layer(x2, values, crow_indices, col_indices, bias):
    """(values, crow, col, bias, N) of a forward layer, checked against x2 [T, K]."""
    values = _check_values(values, x2.device)
    nnz, bm, bk = values.shape
    crow_indices = _check_index("crow_indices", crow_indices, None, x2.device)
    col_indices = _check_index("col_indices", col_indices, nnz, x2.device)
    n = (crow_indices.numel() - 1) * bm
    if x2.dim() != 2 or x2.shape[1] % bk:
        raise ValueError(f"x2 must be [T, K] with K a multiple of the block width {bk}, "
                         f"got {list(x2.shape)}")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
        if bias.dtype != x2.dtype or bias.device != x2.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}; expected {x2.dtype} on "
                            f"{x2.device}")
        bias = bias.contiguous()
    return values, crow_indices, col_indices, bias, n


def forward(x2: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
               col_indices: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = None) -> torch.Tensor:
    """y2[T, N] = activation(x2[T, K] @ W.T + bias), W the BSR [N, K] of (values, crow, col).

    activation: None/"none", "gelu" (exact, erf form), "gelu_tanh", "relu" or "silu", fused
    into the epilogue.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    values, crow_indices, col_indices, bias, n = _check_layer(x2, values, crow_indices,
                                                              col_indices, bias)
    x2 = _check_dense("x2", x2, x2.shape[1], x2.device, values.dtype)
    out = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    return _launch_rowblock(x2, values, crow_indices, col_indices, None, bias, out,
                            values.shape[1], values.shape[2], transposed=True,
                            activation=activation)


def bsr_gated_linear(x2: torch.Tensor, values_g: torch.Tensor, crow_g: torch.Tensor,
                     col_g: torch.Tensor, bias_g: Optional[torch.Tensor], values_u: torch.Tensor,
                     crow_u: torch.Tensor, col_u: torch.Tensor, bias_u: Optional[torch.Tensor],
                     activation: str = "silu") -> torch.Tensor:
    """h2[T, N] = activation(x2 @ Wg.T + bias_g) * (x2 @ Wu.T + bias_u): a gated FFN's first
    half in one kernel (gate and up products per tile, the activation-multiply in its
    epilogue). Wg and Wu: BSR [N, K] with the same block size; biases both or neither."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if (bias_g is None) != (bias_u is None):
        raise ValueError("bsr_gated_linear takes both biases or neither (pass zeros for one)")
    values_g, crow_g, col_g, bias_g, n = _check_layer(x2, values_g, crow_g, col_g, bias_g)
    values_u, crow_u, col_u, bias_u, n_u = _check_layer(x2, values_u, crow_u, col_u, bias_u)
    if n_u != n or values_u.shape[1:] != values_g.shape[1:]:
        raise ValueError(f"gate and up must have the same shape and block size, got {n} outputs "
                         f"in {tuple(values_g.shape[1:])} blocks and {n_u} in "
                         f"{tuple(values_u.shape[1:])}")
    if values_u.dtype != values_g.dtype:
        raise TypeError(f"gate is {values_g.dtype}, up is {values_u.dtype}")
    x2 = _check_dense("x2", x2, x2.shape[1], x2.device, values_g.dtype)
    out = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    return _launch_rowblock(x2, values_g, crow_g, col_g, None, bias_g, out, values_g.shape[1],
                            values_g.shape[2], transposed=True, activation=activation,
                            up=(values_u, crow_u, col_u, bias_u))


def bsr_dsd(g2: torch.Tensor, values: torch.Tensor, ccol_indices: torch.Tensor,
            row_indices_t: torch.Tensor, transpose_perm: torch.Tensor) -> torch.Tensor:
    """out[T, K] = g2[T, N] @ W: dense x sparse -> dense (the input gradient of bsr_linear)."""
    values = _check_values(values, g2.device)
    nnz, bm, bk = values.shape
    ccol_indices = _check_index("ccol_indices", ccol_indices, None, g2.device)
    row_indices_t = _check_index("row_indices_t", row_indices_t, nnz, g2.device)
    transpose_perm = _check_index("transpose_perm", transpose_perm, nnz, g2.device)
    k = (ccol_indices.numel() - 1) * bk
    if g2.dim() != 2 or g2.shape[1] % bm:
        raise ValueError(f"g2 must be [T, N] with N a multiple of the block height {bm}, "
                         f"got {list(g2.shape)}")
    g2 = _check_dense("g2", g2, g2.shape[1], g2.device, values.dtype)
    out = torch.empty((g2.shape[0], k), dtype=g2.dtype, device=g2.device)
    return _launch_rowblock(g2, values, ccol_indices, row_indices_t, transpose_perm, None, out,
                            bk, bm, transposed=False, activation=None)


def _sdd_splits(t: int, nnz: int, device: torch.device) -> int:
    """Split T when the stored blocks alone cannot fill the GPU (about 2 programs per SM)."""
    if device.type != "cuda" or nnz == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, nnz), triton.cdiv(t, 8 * _SDD_SPLIT_QUANTUM)))


def bsr_sdd(g2: torch.Tensor, x2: torch.Tensor, row_indices: torch.Tensor,
            col_indices: torch.Tensor, block_m: int, block_k: int,
            split_t: Optional[int] = None) -> torch.Tensor:
    """Blocks [nnz, bm, bk] of g2[T, N].T @ x2[T, K] at the stored (row, col) positions.

    split_t: number of token ranges reduced separately (fp32 partials, summed in a fixed
    order, so the result is deterministic); None picks one from the GPU size.
    """
    for b in (block_m, block_k):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sides must be powers of two >= 16, got {(block_m, block_k)}")
    if g2.dim() != 2 or x2.dim() != 2 or g2.shape[0] != x2.shape[0]:
        raise ValueError(f"g2 [T, N] and x2 [T, K] need the same T, got {list(g2.shape)} and "
                         f"{list(x2.shape)}")
    g2 = _check_dense("g2", g2, g2.shape[1], g2.device, g2.dtype)
    x2 = _check_dense("x2", x2, x2.shape[1], g2.device, g2.dtype)
    row_indices = _check_index("row_indices", row_indices, None, g2.device)
    col_indices = _check_index("col_indices", col_indices, row_indices.numel(), g2.device)
    if g2.shape[1] % block_m or x2.shape[1] % block_k:
        raise ValueError(f"g2 width {g2.shape[1]} and x2 width {x2.shape[1]} must be multiples "
                         f"of the block size ({block_m}, {block_k})")
    t, nnz = g2.shape[0], row_indices.numel()
    if nnz == 0 or t == 0:
        return torch.zeros((nnz, block_m, block_k), dtype=g2.dtype, device=g2.device)
    split = split_t if split_t is not None else _sdd_splits(t, nnz, g2.device)
    split = min(max(1, int(split)), 65535)  # the grid's second axis
    quantum = _SDD_SPLIT_QUANTUM
    t_per_split = triton.cdiv(triton.cdiv(t, split), quantum) * quantum
    split = triton.cdiv(t, t_per_split)
    if split == 1:
        out = torch.empty((1, nnz, block_m, block_k), dtype=g2.dtype, device=g2.device)
    else:
        out = torch.empty((split, nnz, block_m, block_k), dtype=torch.float32, device=g2.device)
    _bsr_sdd_kernel[(nnz, split)](
        g2, x2, out, row_indices, col_indices,
        t, t_per_split, _t_bucket(t),
        g2.stride(0), x2.stride(0), out.stride(0), out.stride(1),
        BLOCK_OUT=block_m, BLOCK_IN=block_k, DOT_PRECISION=_dot_precision(g2.dtype),
        UPCAST_DOT=_upcast_dot(g2.dtype),
    )
    return out[0] if split == 1 else out.sum(0).to(g2.dtype)
