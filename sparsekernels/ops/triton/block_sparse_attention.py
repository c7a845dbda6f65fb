"""Triton block-sparse attention: FlashAttention-2 style forward and backward that visit only
the (query block, key block) pairs stored in the layout.

The layout arrives as a padded index (see sparsekernels.ops.block_sparse_attention):
  kv_idx [B, H, nq, nk] int32   key blocks of each query block, stored ones first
  kv_cnt [B, H, nq]     int32   how many are stored
and its transpose (q_idx, q_cnt) for the key/value gradient. A query block with no stored key
block runs an empty loop and writes zeros; nothing outside the layout is loaded.

The additive / bool attention mask (any tensor broadcastable to [B, H, Lq, Lk]: strides of 0
on broadcast dims) is loaded tile by tile, only for stored pairs.

Grouped-query attention: k and v have H / GROUP heads; query head h reads key/value head
h // GROUP. The dK/dV program of a key block loops over the GROUP query heads that read it.
Positions: query i sits at OFFSET + i with OFFSET = Lk - Lq (the queries end the keys);
causal keeps keys j <= OFFSET + i, a window W keeps OFFSET + i - j < W (and, without causal,
j - OFFSET - i < W).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekernels.ops.reference.block_sparse_attention import stats_dtype

# 1.4426950408889634 below is log2(e): the kernels use exp2, scaling the scores by it


@triton.jit
def _scores(q, k, Mask, mask_base, stride_mm, stride_mn, offs_m, offs_n, Lq, Lk, qk_scale,
            offset, window,
            HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
            HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr):
    """Scores of one tile in the log2 domain; -inf outside the sequence, mask, causal band or
    window. q [M, D], k [N, D]. EVEN: both lengths are block multiples (no bounds to check)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    bounds = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if HAS_MASK:
        m_ptrs = Mask + mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        if EVEN:
            raw = tl.load(m_ptrs)
        else:
            raw = tl.load(m_ptrs, mask=bounds, other=0)
        if MASK_IS_BOOL:
            qk = tl.where(raw != 0, qk, float("-inf"))
        else:
            bias = raw.to(tl.float32)
            # finite masks stay finite in the log2 domain (finfo.min * log2(e) would overflow to
            # -inf and empty a fully padded row that eager softmax spreads uniformly)
            bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -1.0e30))
            qk += bias * 1.4426950408889634
    if not EVEN:
        qk = tl.where(bounds, qk, float("-inf"))
    dist = (offs_m[:, None] + offset) - offs_n[None, :]  # query position - key position
    if IS_CAUSAL:
        qk = tl.where(dist >= 0, qk, float("-inf"))
    if HAS_WINDOW:
        if IS_CAUSAL:
            qk = tl.where(dist < window, qk, float("-inf"))
        else:
            qk = tl.where((dist < window) & (dist > -window), qk, float("-inf"))
    return qk


@triton.jit
def _keep(seed, pid_bh, offs_m, offs_n, Lk, dropout_p):
    """Dropout keep mask of one tile; the same bits in forward and backward."""
    offs = offs_m[:, None] * Lk + offs_n[None, :]
    return tl.rand(seed + pid_bh, offs) >= dropout_p


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, Mask, KvIdx, KvCnt, Out, Stats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_cb, stride_ch, stride_cm,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, Lq, Lk, D, sm_scale, dropout_p, seed, offset, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    EVEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if EVEN:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = b * stride_mb + h * stride_mh
    idx_base = KvIdx + b * stride_ib + h * stride_ih + pid_m * stride_im
    cnt = tl.load(KvCnt + b * stride_cb + h * stride_ch + pid_m * stride_cm)
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, cnt):
        kb = tl.load(idx_base + i * stride_ik)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        if EVEN:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        qk = _scores(q, k, Mask, mask_base, stride_mm, stride_mn, offs_m, offs_n, Lq, Lk,
                     qk_scale, offset, window, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, HAS_WINDOW,
                     PRECISION, EVEN)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _keep(seed, pid_bh, offs_m, offs_n, Lk, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if EVEN:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    live = l_i > 0.0
    acc = acc / tl.where(live, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & d_ok[None, :])
    # softmax statistics for the backward, [B, H, 2, Lq]: row max (log2 units; +inf on empty
    # rows, so that the backward's P is 0 there) and log2 of the row sum, kept apart so that a
    # row padded by a huge finite mask keeps its normaliser
    stats = Stats + pid_bh * 2 * Lq + offs_m
    tl.store(stats, tl.where(live, m_i, float("inf")), mask=offs_m < Lq)
    tl.store(stats + Lq, tl.math.log2(tl.where(live, l_i, 1.0)), mask=offs_m < Lq)


@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, Mask, DO, Stats, Delta, QIdx, QCnt, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ib, stride_ih, stride_in, stride_ik,
    stride_cb, stride_ch, stride_cn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, GROUP, Lq, Lk, D, sm_scale, dropout_p, seed, offset, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    EVEN: tl.constexpr,
):
    """One key block of one key/value head per program: dK, dV summed over the query blocks
    of the GROUP query heads that attend to it. DK and DV are contiguous [B, H/GROUP, Lk, D]."""
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    hkv = H // GROUP
    b = pid_bhk // hkv
    hk = pid_bhk % hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        pid_bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        mask_base = b * stride_mb + h * stride_mh
        idx_base = QIdx + b * stride_ib + h * stride_ih + pid_n * stride_in
        cnt = tl.load(QCnt + b * stride_cb + h * stride_ch + pid_n * stride_cn)
        for i in range(0, cnt):
            qb = tl.load(idx_base + i * stride_ik)
            offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=q_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                         mask=q_ok, other=0.0)
            row_max = tl.load(Stats + pid_bh * 2 * Lq + offs_m, mask=offs_m < Lq,
                              other=float("inf"))
            log_sum = tl.load(Stats + pid_bh * 2 * Lq + Lq + offs_m, mask=offs_m < Lq, other=0.0)
            delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
            qk = _scores(q, k, Mask, mask_base, stride_mm, stride_mn, offs_m, offs_n, Lq, Lk,
                         qk_scale, offset, window, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL,
                         HAS_WINDOW, PRECISION, EVEN)
            p = tl.math.exp2((qk - row_max[:, None]) - log_sum[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if DROPOUT:
                keep = _keep(seed, pid_bh, offs_m, offs_n, Lk, dropout_p)
                p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                p_used = p
            dv += tl.dot(tl.trans(p_used.to(do.dtype)), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * sm_scale
    out_off = pid_bhk * Lk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bsa_bwd_dq_kernel(
    Q, K, V, Mask, DO, Stats, Delta, KvIdx, KvCnt, DQ, DBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_cb, stride_ch, stride_cm,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, GROUP, Lq, Lk, D, sm_scale, dropout_p, seed, offset, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    EVEN: tl.constexpr, WRITE_DBIAS: tl.constexpr,
):
    """One query block per program: dQ over its stored key blocks, and optionally the score
    gradient (the additive mask's gradient) into a zero-initialised [B, H, Lq, Lk]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_ok, other=0.0)
    row_max = tl.load(Stats + pid_bh * 2 * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    log_sum = tl.load(Stats + pid_bh * 2 * Lq + Lq + offs_m, mask=offs_m < Lq, other=0.0)
    delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = b * stride_mb + h * stride_mh
    idx_base = KvIdx + b * stride_ib + h * stride_ih + pid_m * stride_im
    cnt = tl.load(KvCnt + b * stride_cb + h * stride_ch + pid_m * stride_cm)
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, cnt):
        kb = tl.load(idx_base + i * stride_ik)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_ok, other=0.0)
        qk = _scores(q, k, Mask, mask_base, stride_mm, stride_mn, offs_m, offs_n, Lq, Lk,
                     qk_scale, offset, window, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, HAS_WINDOW,
                     PRECISION, EVEN)
        p = tl.math.exp2((qk - row_max[:, None]) - log_sum[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, pid_bh, offs_m, offs_n, Lk, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if WRITE_DBIAS:
            db_ptrs = DBias + pid_bh * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :]
            tl.store(db_ptrs, ds.to(DBias.dtype.element_ty),
                     mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + pid_bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_ok)


@triton.jit
def _keep_mask_kernel(Out, H, Lq, Lk, dropout_p, seed,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, pid_bh, offs_m, offs_n, Lk, dropout_p)
    tl.store(Out + pid_bh * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


# --- launchers -------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (models are compared to eager at 1e-4)
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _mask_args(mask, q, k):
    """(tensor, 4 strides, is_bool) of a mask broadcast to [B, H, Lq, Lk] without copying."""
    if mask is None:
        return q, (0, 0, 0, 0), False
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    m = mask.expand(b, h, lq, lk)
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.view(torch.uint8)  # same element size: a zero-copy reinterpretation
    return m, tuple(m.stride()), is_bool


def _meta(q, block_q, block_k):
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    num_warps = 4 if block_q * block_d <= 64 * 64 else 8
    return dict(BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d,
                PRECISION=_precision(q.dtype), num_warps=num_warps)


def _even(q, k, block_q, block_k) -> bool:
    """No bounds to check: both lengths are block multiples and the head dim a power of 2."""
    d = q.shape[-1]
    return (q.shape[2] % block_q == 0 and k.shape[2] % block_k == 0
            and d == max(16, triton.next_power_of_2(d)))


def _position_args(q, k, causal: bool, window: int) -> dict:
    """The runtime position arguments and flags every kernel takes."""
    return dict(offset=k.shape[2] - q.shape[2], window=int(window), IS_CAUSAL=bool(causal),
                HAS_WINDOW=window > 0)


def forward(q, k, v, kv_idx, kv_cnt, mask, causal: bool, window: int, scale: float,
            block_q: int, block_k: int, dropout_p: float, seed: int):
    """(out [B, H, Lq, D] in q's dtype, softmax stats [B, H, 2, Lq] fp32); k, v [B, Hkv, Lk, D]."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    stats = torch.empty((b, h, 2, lq), device=q.device,
                        dtype=stats_dtype(q.dtype))
    if out.numel() == 0 or lk == 0:  # no key: every row is empty
        out.zero_()
        stats[:, :, 0].fill_(float("inf"))
        stats[:, :, 1].zero_()
        return out, stats
    m, ms, mask_bool = _mask_args(mask, q, k)
    grid = (triton.cdiv(lq, block_q), b * h)
    _bsa_fwd_kernel[grid](
        q, k, v, m, kv_idx, kv_cnt, out, stats,
        *q.stride(), *k.stride(), *v.stride(), *ms, *kv_idx.stride(), *kv_cnt.stride(),
        *out.stride(),
        h, h // k.shape[1], lq, lk, d, float(scale), float(dropout_p), int(seed),
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask_bool, DROPOUT=dropout_p > 0.0,
        EVEN=_even(q, k, block_q, block_k), **_position_args(q, k, causal, window),
        **_meta(q, block_q, block_k))
    return out, stats


def backward(grad_out, q, k, v, out, stats, kv_idx, kv_cnt, q_idx, q_cnt, mask, causal: bool,
             window: int, scale: float, block_q: int, block_k: int, dropout_p: float, seed: int,
             need_dbias: bool):
    """(dq, dk, dv, dscores or None); dk, dv [B, Hkv, Lk, D] sum each group's query heads;
    dscores is [B, H, Lq, Lk] fp32, zero off the layout."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    stats = stats.contiguous()
    m, ms, mask_bool = _mask_args(mask, q, k)
    dq = torch.empty((b, h, lq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, hkv, lk, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, lk, v.shape[-1]), device=q.device, dtype=v.dtype)
    dbias = (torch.zeros((b, h, lq, lk), device=q.device, dtype=torch.float32)
             if need_dbias else dq)
    if dq.numel() == 0 or dk.numel() == 0:  # nothing attends: zero gradients
        return dq.zero_(), dk.zero_(), dv.zero_(), (dbias if need_dbias else None)
    common = dict(HAS_MASK=mask is not None, MASK_IS_BOOL=mask_bool, DROPOUT=dropout_p > 0.0,
                  EVEN=_even(q, k, block_q, block_k), **_position_args(q, k, causal, window),
                  **_meta(q, block_q, block_k))
    _bsa_bwd_dkdv_kernel[(triton.cdiv(lk, block_k), b * hkv)](
        q, k, v, m, grad_out, stats, delta, q_idx, q_cnt, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *ms, *q_idx.stride(), *q_cnt.stride(),
        *grad_out.stride(),
        h, h // hkv, lq, lk, d, float(scale), float(dropout_p), int(seed), **common)
    _bsa_bwd_dq_kernel[(triton.cdiv(lq, block_q), b * h)](
        q, k, v, m, grad_out, stats, delta, kv_idx, kv_cnt, dq, dbias,
        *q.stride(), *k.stride(), *v.stride(), *ms, *kv_idx.stride(), *kv_cnt.stride(),
        *grad_out.stride(),
        h, h // hkv, lq, lk, d, float(scale), float(dropout_p), int(seed),
        WRITE_DBIAS=need_dbias, **common)
    return dq, dk, dv, (dbias if need_dbias else None)


def dropout_keep_mask(seed: int, shape, dropout_p: float, device) -> torch.Tensor:
    """The bool keep mask [B, H, Lq, Lk] the kernels draw for `seed` (for tests)."""
    b, h, lq, lk = shape
    out = torch.empty((b, h, lq, lk), device=device, dtype=torch.int8)
    grid = (triton.cdiv(lq, 32), triton.cdiv(lk, 32), b * h)
    _keep_mask_kernel[grid](out, h, lq, lk, float(dropout_p), int(seed), BLOCK_M=32, BLOCK_N=32)
    return out.bool()
