"""sparsekernels::block_sparse_attention and its backward op, with backend dispatch.

Two custom ops (torch.library), each with a fake implementation:
  block_sparse_attention(q, k, v, layout, ...)          -> (out, stats)  forward
  block_sparse_attention_backward(grad_out, q, k, v, ...) -> (dq, dk, dv, dmask)
The forward has an autograd formula made of the backward op. `layout` is a bool block mask
[(B,) H, ceil(Lq/bq), ceil(Lk/bk)] per query head: only its true (query block, key block)
pairs are computed; the rest count as -inf scores, and a query row with no allowed key gets
zeros (never NaN). k and v may have fewer heads than q (grouped-query attention: query head h
reads key/value head h // (H / Hkv), never copied per query head). Positions (causal, window):
the queries are the last Lq of the Lk key positions, as in a KV cache (see the reference).

Backends: triton (GPU; CPU under TRITON_INTERPRET=1), cuda (C++/CUDA forward), cpu (C++
extension, forward and backward), reference (float64-capable dense oracle). The CUDA
forward has no backward of its own; its backward runs on Triton when available.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from sparsekernels.ops.limits import check_block_size
from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.eager import plain_inference
from sparsekernels.ops.reference import block_sparse_attention as ref
from sparsekernels.ops.router import DECODE_MAX_QUERIES, route

OP = "block_sparse_attention"
# torch's names (torch.backends.cpu.fp32_precision), and "int8": Q K^T in int8, P V in bf16
FP32_PRECISIONS = ("ieee", "bf16", "int8")
LOW_PRECISIONS = ("bf16", "int8")  # products below fp32


def _triton():
    from sparsekernels.ops.triton import block_sparse_attention as triton_bsa

    return triton_bsa


# --- layout -> padded block index --------------------------------------------------------
def reachable_blocks(nq: int, nk: int, block_q: int, block_k: int, causal: bool,
                     window: int = 0, lq: Optional[int] = None, lk: Optional[int] = None,
                     device=None) -> Optional[Tensor]:
    """Bool [nq, nk]: the (query block, key block) pairs where `causal` / `window` leave some
    (query, key) pair visible (None: all of them). Query i sits at position lk - lq + i;
    lq and lk default to the grid's extent with lq == lk."""
    if not causal and not window:
        return None
    lq = nq * block_q if lq is None else lq
    lk = lq if lk is None else lk
    qb = torch.arange(nq, device=device)
    kb = torch.arange(nk, device=device)
    q_first = qb * block_q + (lk - lq)
    q_last = torch.clamp(qb * block_q + block_q, max=max(lq, 1)) - 1 + (lk - lq)
    k_first = kb * block_k
    k_last = torch.clamp(kb * block_k + block_k, max=max(lk, 1)) - 1
    lo = q_first[:, None] - k_last[None, :]  # the smallest position - key distance in the pair
    hi = q_last[:, None] - k_first[None, :]  # the largest
    ok = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        ok &= hi >= 0
    if window:
        ok &= lo < window
        if not causal:
            ok &= hi > -window
    return ok


def effective_layout(layout: Tensor, causal: bool, block_q: int, block_k: int,
                     lq: Optional[int] = None, lk: Optional[int] = None,
                     window: int = 0) -> Tensor:
    """The layout without the blocks that causal masking / the window empty entirely."""
    ok = reachable_blocks(layout.shape[-2], layout.shape[-1], block_q, block_k, causal, window,
                          lq, lk, layout.device)
    return layout if ok is None else layout & ok


def block_index(layout: Tensor) -> tuple[Tensor, Tensor]:
    """Bool [B, H, n, m] -> (idx [B, H, n, m] int32: the true columns of each row first, in
    increasing order; cnt [B, H, n] int32). Static shapes: no host sync, compile-friendly."""
    # a counting sort: a stable argsort of ~layout is far slower on the CPU
    m = layout.shape[-1]
    before = torch.cumsum(layout, -1, dtype=torch.int32)  # true entries up to and here
    cnt = before[..., -1].contiguous() if m else layout.sum(-1, dtype=torch.int32)
    cols = torch.arange(m, device=layout.device, dtype=torch.int32)
    pos = torch.where(layout, before - 1, cnt.unsqueeze(-1) + cols - before)
    idx = torch.empty_like(pos).scatter_(-1, pos.long(), cols.expand_as(pos))
    return idx, cnt


def _layout4(layout: Tensor) -> Tensor:
    """[(B,) H, nq, nk] -> [B or 1, H, nq, nk]."""
    return layout if layout.dim() == 4 else layout.unsqueeze(0)


def _index(lay: Tensor, batch: int, contiguous: bool) -> tuple[Tensor, Tensor]:
    """block_index of a [B or 1, H, n, m] layout for `batch` rows: a stride-0 batch dim for
    the Triton kernels (they take strides), materialised for the C++ kernels."""
    if contiguous:
        return block_index(lay.expand(batch, *lay.shape[1:]))
    idx, cnt = block_index(lay)
    return idx.expand(batch, *idx.shape[1:]), cnt.expand(batch, *cnt.shape[1:])


# layout tensor -> {(its version, how it is indexed): (idx, cnt)}. enable_ hands every forward
# and backward of a layer the same layout tensor: building its index (a handful of small
# kernels, host-side launch cost that rivals the attention kernel at short sequences) once
# is enough. Keyed by identity, dropped with the layout; an in-place change bumps _version.
_INDEX_CACHE = WeakIdKeyDictionary()


def layout_index(layout: Tensor, causal: bool, block_q: int, block_k: int, batch: int,
                 contiguous: bool, transposed: bool = False, lq: Optional[int] = None,
                 lk: Optional[int] = None, window: int = 0) -> tuple[Tensor, Tensor]:
    """The block index of `layout` with causal masking / the window applied: over key blocks
    per query block, or (transposed) over query blocks per key block, for the GPU kernels."""
    def build():
        lay = _layout4(effective_layout(layout, causal, block_q, block_k, lq, lk, window))
        return _index(lay.transpose(-1, -2) if transposed else lay, batch, contiguous)

    if torch.compiler.is_compiling():
        return build()
    per_layout = _INDEX_CACHE.setdefault(layout, {})
    key = (layout._version, causal, window, lq, lk, block_q, block_k, batch, contiguous,
           transposed)
    if key not in per_layout:
        if any(k[0] != layout._version for k in per_layout):
            per_layout.clear()  # changed in place: every older index is stale
        per_layout[key] = build()
    return per_layout[key]


stats_dtype = ref.stats_dtype


def _mask4(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    if attn_mask is None:
        return None
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def prefers_dense(q: Tensor, k: Tensor, layout: Tensor, dropout_p: float,
                  backend: "Backend | str") -> bool:
    """The router's choice for an all-true layout: dense SDPA (auto on the CPU) from the
    measured key length on (Route.dense_full_from; shorter ones ran faster on the kernel),
    except at decode (at most DECODE_MAX_QUERIES queries against a KV cache), where the
    kernel reads each key/value block once for its whole group of query heads."""
    if q.shape[2] <= DECODE_MAX_QUERIES or k.shape[2] == 0:
        return False
    r = route(OP, q.device, q.dtype, backend, head_dim=q.shape[-1], dropout=dropout_p > 0)
    return r.dense_full_layout and k.shape[2] >= r.dense_full_from and bool(layout.all())


def _choose(backend: str, q: Tensor, dropout_p: float, for_backward: bool,
            k: Optional[Tensor] = None, layout: Optional[Tensor] = None) -> Optional[Backend]:
    """The backend that runs this call: the router's choice for this head size, dropout and
    direction (see sparsekernels.ops.router). With `k` and `layout` (the public entry asks
    first): None when the call runs as plain dense SDPA instead of the op."""
    if layout is not None and prefers_dense(q, k, layout, dropout_p, backend):
        return None
    return route(OP, q.device, q.dtype, backend, head_dim=q.shape[-1], dropout=dropout_p > 0,
                 backward=for_backward).backend


def _dropout_mask(seed: int, shape, dropout_p: float, device):
    """The reference's keep mask, drawn by torch from `seed` (the same in forward and backward;
    not the Triton kernels' bits)."""
    if dropout_p == 0.0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


# --- forward -------------------------------------------------------------------------------
def _forward(q: Tensor, k: Tensor, v: Tensor, layout: Tensor, attn_mask: Optional[Tensor],
             causal: bool, window: int, scale: float, block_q: int, block_k: int,
             dropout_p: float, seed: int, backend: str,
             fp32_precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """The forward op's implementation: routes `backend`, then runs it (_run)."""
    chosen = _choose(backend, q, dropout_p, for_backward=False)
    return _run(chosen, q, k, v, layout, attn_mask, causal, window, scale, block_q, block_k,
                dropout_p, seed, fp32_precision=fp32_precision)


def _run(chosen: Backend, q: Tensor, k: Tensor, v: Tensor, layout: Tensor,
         attn_mask: Optional[Tensor], causal: bool, window: int, scale: float, block_q: int,
         block_k: int, dropout_p: float, seed: int,
         need_stats: bool = True, fp32_precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """The forward on the backend the router chose (eager inference calls it directly with
    the public entry's choice, see sparsekernels.ops.eager: one route a call, not two).
    need_stats=False (eager inference): the CPU kernel skips the softmax statistics (only a
    backward reads them), runs through its direct entry (no dispatcher) and returns None in
    their place. fp32_precision "bf16" / "int8": the CPU
    kernel's lower-precision products (see block_sparse_attention)."""
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    mask = _mask4(attn_mask)
    if chosen is Backend.CPU:  # builds its block lists (positions included) in C++
        if not need_stats:  # eager inference: the kernel without the dispatcher's cost
            direct = _ext.direct("attention_inference")
            if direct is not None:
                return direct(q, k, v, _layout4(layout), mask, causal, window, scale, block_q,
                              block_k, fp32_precision == "bf16",
                              fp32_precision == "int8"), None
        return _ext.op(OP, "cpu")(q, k, v, _layout4(layout), mask, causal, window, scale,
                                  block_q, block_k, True, need_stats,
                                  fp32_precision == "bf16", fp32_precision == "int8")
    if chosen is Backend.TRITON:
        idx, cnt = layout_index(layout, causal, block_q, block_k, b, contiguous=False, lq=lq,
                                lk=lk, window=window)
        out, stats = _triton().forward(q, k, v, idx, cnt, mask, causal, window, scale, block_q,
                                       block_k, dropout_p, seed)
        return _out_layout(out), stats
    if chosen is Backend.CUDA:
        idx, cnt = layout_index(layout, causal, block_q, block_k, b, contiguous=True, lq=lq,
                                lk=lk, window=window)
        return _ext.op(OP, "cuda")(q, k, v, idx, cnt, mask, causal, window, scale, block_q,
                                   block_k)
    drop = _dropout_mask(seed, (b, q.shape[1], lq, lk), dropout_p, q.device)
    out, stats = ref.block_sparse_attention(q, k, v, _layout4(layout), (block_q, block_k),
                                            mask, causal, scale, drop, dropout_p, window)
    return _out_layout(out), stats.contiguous()


def _out_layout(out: Tensor) -> Tensor:
    """The op's output layout: on the CPU, [B, H, Lq, D] as a view of [B, Lq, H, D] memory
    (as the C++ kernel writes it, and SDPA's CPU flash kernel returns it: the caller's
    transpose back to [B, Lq, H * D] copies nothing); contiguous elsewhere."""
    if out.device.type != "cpu":
        return out.contiguous()
    return out.transpose(1, 2).contiguous().transpose(1, 2)


_block_sparse_attention = torch.library.custom_op("sparsekernels::block_sparse_attention",
                                                  _forward, mutates_args=())


@_block_sparse_attention.register_fake
def _(q, k, v, layout, attn_mask, causal, window, scale, block_q, block_k, dropout_p, seed,
      backend, fp32_precision="ieee"):
    b, h, lq, _ = q.shape
    out = _out_layout(q.new_empty((b, h, lq, v.shape[-1])))
    stats = q.new_empty((b, h, 2, lq), dtype=stats_dtype(q.dtype))
    return out, stats


# --- backward ------------------------------------------------------------------------------
@torch.library.custom_op("sparsekernels::block_sparse_attention_backward", mutates_args=())
def _block_sparse_attention_backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
        layout: Tensor, attn_mask: Optional[Tensor], causal: bool, window: int, scale: float,
        block_q: int, block_k: int, dropout_p: float, seed: int, need_dmask: bool,
        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dscores): dk, dv have k's heads (summed over each group of query heads);
    dscores [B, H, Lq, Lk] fp32 is the gradient of the additive mask before broadcasting
    (empty [0] unless need_dmask)."""
    chosen = _choose(backend, q, dropout_p, for_backward=True)
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    mask = _mask4(attn_mask)
    grad_out = grad_out.contiguous()
    empty = q.new_empty((0,), dtype=torch.float32)
    if chosen is Backend.CPU:
        dq, dk, dv, ds = _ext.op(OP + "_backward", "cpu")(
            grad_out, q, k, v, out, stats, _layout4(layout), mask, causal, window, scale,
            block_q, block_k, need_dmask)
        return dq, dk, dv, (ds if need_dmask else empty)
    if chosen is Backend.TRITON:
        where = dict(lq=lq, lk=lk, window=window)
        kv_idx, kv_cnt = layout_index(layout, causal, block_q, block_k, b, contiguous=False,
                                      **where)
        q_idx, q_cnt = layout_index(layout, causal, block_q, block_k, b, contiguous=False,
                                    transposed=True, **where)
        dq, dk, dv, ds = _triton().backward(grad_out, q, k, v, out, stats, kv_idx, kv_cnt, q_idx,
                                            q_cnt, mask, causal, window, scale, block_q, block_k,
                                            dropout_p, seed, need_dmask)
        return dq, dk, dv, (ds if need_dmask else empty)
    drop = _dropout_mask(seed, (b, q.shape[1], lq, lk), dropout_p, q.device)
    dq, dk, dv, ds = ref.block_sparse_attention_backward(
        grad_out, q, k, v, _layout4(layout), (block_q, block_k), mask, causal, scale, drop,
        dropout_p, window=window)
    return (dq.contiguous(), dk.contiguous(), dv.contiguous(),
            ds.float().contiguous() if need_dmask else empty)


@_block_sparse_attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, layout, attn_mask, causal, window, scale, block_q,
      block_k, dropout_p, seed, need_dmask, backend):
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    ds = (q.new_empty((b, h, lq, lk), dtype=torch.float32) if need_dmask
          else q.new_empty((0,), dtype=torch.float32))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds)


# --- autograd ------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    (q, k, v, layout, attn_mask, causal, window, scale, block_q, block_k, dropout_p, seed,
     backend, _) = inputs  # the backward computes in the inputs' precision
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, layout, attn_mask)
    ctx.args = (causal, window, scale, block_q, block_k, dropout_p, seed, backend)
    ctx.mask_shape = None if attn_mask is None else attn_mask.shape
    ctx.mask_dtype = None if attn_mask is None else attn_mask.dtype


def _reduce_to(grad: Tensor, shape) -> Tensor:
    """Sum a [B, H, Lq, Lk] gradient over the dims the mask was broadcast along."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _backward(ctx, grad_out, grad_stats):
    q, k, v, out, stats, layout, attn_mask = ctx.saved_tensors
    causal, window, scale, block_q, block_k, dropout_p, seed, backend = ctx.args
    need_dmask = (attn_mask is not None and attn_mask.dtype != torch.bool
                  and ctx.needs_input_grad[4])
    dq, dk, dv, ds = torch.ops.sparsekernels.block_sparse_attention_backward(
        grad_out, q, k, v, out, stats, layout, attn_mask, causal, window, scale, block_q,
        block_k, dropout_p, seed, need_dmask, backend)
    dmask = _reduce_to(ds, ctx.mask_shape).to(ctx.mask_dtype) if need_dmask else None
    return dq, dk, dv, None, dmask, None, None, None, None, None, None, None, None, None


_block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)


# --- public entry point --------------------------------------------------------------------
def check_inputs(q: Tensor, k: Tensor, v: Tensor, layout: Tensor, block_size,
                 attn_mask: Optional[Tensor]) -> tuple[int, int]:
    """Validate shapes, dtypes and devices; returns the block size (bq, bk)."""
    bq, bk = check_block_size(block_size)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got "
                             f"{list(t.shape)}")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if (k.shape[0] != b or hkv == 0 or h % hkv or v.shape[:3] != k.shape[:3]
            or k.shape[3] != d):
        raise ValueError(f"shape mismatch: q {list(q.shape)}, k {list(k.shape)}, v "
                         f"{list(v.shape)}; expected k [b, Hkv, Lk, {d}] and v [b, Hkv, Lk, dv] "
                         f"with b={b} and Hkv dividing the {h} query heads (grouped-query "
                         "attention: query head h reads key/value head h // (H / Hkv))")
    if v.shape[3] != d:
        raise ValueError(f"v's head dim {v.shape[3]} differs from q/k's {d}: not supported")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"unsupported dtype {q.dtype}: use float16, bfloat16, float32 or "
                        "float64")
    if not (q.device == k.device == v.device == layout.device):
        raise ValueError(f"device mismatch: q {q.device}, k {k.device}, v {v.device}, layout "
                         f"{layout.device}")
    nq, nk = -(-lq // bq), -(-lk // bk)
    if layout.dtype != torch.bool:
        raise TypeError(f"layout must be a bool tensor, got {layout.dtype}")
    if layout.dim() not in (3, 4) or tuple(layout.shape[-3:]) != (h, nq, nk) or (
            layout.dim() == 4 and layout.shape[0] not in (1, b)):
        raise ValueError(f"layout must be [heads, ceil(Lq/bq), ceil(Lk/bk)] = [{h}, {nq}, {nk}] "
                         f"(one row per query head, optionally with a leading batch dim 1 or "
                         f"{b}) for q {list(q.shape)}, k {list(k.shape)} and block size "
                         f"{(bq, bk)}; got {list(layout.shape)}")
    if attn_mask is not None:
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = attend) or an additive float mask, "
                            f"got {attn_mask.dtype}")
        try:
            ok = (attn_mask.dim() <= 4 and
                  torch.broadcast_shapes(attn_mask.shape, (b, h, lq, lk)) == (b, h, lq, lk))
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                             f"[batch, heads, Lq, Lk] = {[b, h, lq, lk]}")
    return bq, bk


_BACKENDS = {b.value: b for b in Backend}


def _check_window(window) -> int:
    if window is None:
        return 0
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"window must be a positive int (the number of most recent key "
                         f"positions a query sees, itself included) or None, got {window!r}")
    return int(window)


def _dense_sdpa(q, k, v, attn_mask, causal: bool, scale: float, window: int) -> Tensor:
    """The dense equivalent of an all-true layout, with this op's semantics: grouped key/value
    heads, queries at the end of the keys, rows with no allowed key give zeros (SDPA gives NaN
    there)."""
    lq, lk = q.shape[2], k.shape[2]
    mask = attn_mask
    by_position = None
    if window or (causal and lq != lk) or (causal and mask is not None):
        by_position = ref.position_mask(lq, lk, causal, window, q.device)
    if by_position is not None:
        if mask is None:
            mask = by_position
        elif mask.dtype == torch.bool:
            mask = mask & by_position
        else:
            mask = mask.masked_fill(~by_position, float("-inf"))
    dead = None
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        # rows with no allowed key: unmask them for SDPA (which would give NaN, and NaN
        # gradients), then zero their output
        allowed = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
        dead = ~allowed.any(-1, keepdim=True)
        mask = (mask | dead) if mask.dtype == torch.bool else mask.masked_fill(dead, 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and by_position is None and mask is None,
        scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out if dead is None else out.masked_fill(dead, 0.0)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: Tensor,
                           block_size=(64, 64), attn_mask: Optional[Tensor] = None,
                           causal: bool = False, scale: Optional[float] = None,
                           dropout_p: float = 0.0, backend: "Backend | str" = "auto",
                           window: Optional[int] = None, fp32_precision: str = "ieee") -> Tensor:
    """softmax(q k^T * scale + attn_mask) v over the (query block, key block) pairs in `layout`.

    q [B, H, Lq, D]; k and v [B, Hkv, Lk, D] with Hkv dividing H (grouped-query attention:
    query head h reads key/value head h // (H / Hkv), without copying them per query head);
    layout bool [(B,) H, ceil(Lq/bq), ceil(Lk/bk)], one row per query head.
    attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Lq, Lk].
    Positions: the queries are the LAST Lq of the Lk key positions (query i at Lk - Lq + i),
    as in a KV cache, FlashAttention >= 2.1 and transformers; with Lq == Lk that is the usual
    square case. causal: query i sees keys j <= Lk - Lq + i (bottom-right aligned; for
    Lq == Lk the same as SDPA's is_causal, which aligns top-left; for top-left alignment with
    Lq != Lk pass the mask `torch.ones(Lq, Lk, dtype=torch.bool).tril()` instead).
    window: None, or the number of most recent key positions a query sees, itself included
    (transformers' `sliding_window`: key j is visible from position p when p - window < j;
    without causal also when j - p < window); applied per element inside the kernels, and
    key blocks entirely outside it are skipped.
    scale: defaults to 1/sqrt(D). dropout_p: attention-probability dropout (training).
    Rows with no allowed key (Lk = 0 included) return zeros, with zero gradients. Non-finite
    q, k, v give the CPU kernel's output nan where SDPA's is (with fp32_precision "int8", a q
    or k row holding an inf cannot be quantized: every output row that sees it is nan).
    The output is [B, H, Lq, D]; on the CPU it is a view of [B, Lq, H, D] memory, as SDPA's
    CPU kernel returns it (out.transpose(1, 2) is contiguous).
    backend: auto (on CPU an all-true layout with more than 16 queries runs as dense SDPA),
    triton, cuda, cpu or reference (SPARSEKERNELS_BACKEND overrides auto).
    fp32_precision: as torch's `torch.backends.cpu.fp32_precision`: "ieee" (default) keeps
    fp32 inputs in fp32; "bf16" lets the CPU kernel round them to bf16 for both products
    (fp32 accumulation, softmax and output; about bf16 inputs' error) where the CPU has
    AVX512-BF16 dot products. "int8" (ours, SageAttention's split) runs q k^T in int8 for fp32
    and bf16 inputs: each query and key row quantized on the fly with its own scale (max |x| /
    127, symmetric), int8 products on AVX512-VNNI with exact int32 sums, then the softmax in
    fp32 and P V in bf16 as "bf16" runs them; where the CPU lacks VNNI it runs as "bf16". Its
    error is about int8's (a few times bf16's; bounds in tests/ops/test_attention_int8_qk.py).
    Neither changes anything elsewhere: fp64 inputs, other backends, a CPU without
    AVX512-BF16, calls that run dense SDPA (see `backend`), and backwards (computed in the
    inputs' precision).
    """
    bq, bk = check_inputs(q, k, v, layout, block_size, attn_mask)
    if fp32_precision.__class__ is not str or fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got "
                         f"{fp32_precision!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    window = _check_window(window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0.0 else 0
    name = backend if backend.__class__ is str and backend in _BACKENDS else (
        Backend.parse(backend).value)
    chosen = _choose(name, q, dropout_p, False, k, layout)
    if chosen is None:
        return _dense_sdpa(q, k, v, attn_mask, bool(causal), scale, window)
    # the op gets the backend chosen here (its backward re-checks what it can run)
    args = (q, k, v, layout, attn_mask, bool(causal), window, scale, bq, bk, float(dropout_p),
            seed)
    if plain_inference(q, k, v, layout, attn_mask):
        return _run(chosen, *args, need_stats=False, fp32_precision=fp32_precision)[0]
    return torch.ops.sparsekernels.block_sparse_attention.default(*args, chosen.value,
                                                                  fp32_precision)[0]
