"""sparsekernels::block_sparse_attention and its backward op, with backend dispatch.

Two custom ops (torch.library), each with a fake implementation:
  block_sparse_attention(q, k, v, layout, ...)          -> (out, stats)  forward
  block_sparse_attention_backward(grad_out, q, k, v, ...) -> (dq, dk, dv, dmask)
The forward has an autograd formula made of the backward op. `layout` is a bool block mask
[(B,) H, ceil(Lq/bq), ceil(Lk/bk)]: only its true (query block, key block) pairs are computed;
the rest count as -inf scores, and a query row with no allowed key gets zeros (never NaN).

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
from sparsekernels.ops.router import route
from sparsekernels.ops.reference import block_sparse_attention as ref

OP = "block_sparse_attention"


def _triton():
    from sparsekernels.ops.triton import block_sparse_attention as triton_bsa

    return triton_bsa


# --- layout -> padded block index --------------------------------------------------------
def effective_layout(layout: Tensor, causal: bool, block_q: int, block_k: int) -> Tensor:
    """The layout with the blocks that causal masking empties entirely removed."""
    if not causal:
        return layout
    nq, nk = layout.shape[-2], layout.shape[-1]
    first_q = torch.arange(nq, device=layout.device) * block_q
    last_q = first_q + block_q - 1
    first_k = torch.arange(nk, device=layout.device) * block_k
    return layout & (first_k[None, :] <= last_q[:, None])


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
                 contiguous: bool, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """The block index of `layout` with causal masking applied: over key blocks per query
    block, or (transposed) over query blocks per key block, for the GPU kernels."""
    def build():
        lay = _layout4(effective_layout(layout, causal, block_q, block_k))
        return _index(lay.transpose(-1, -2) if transposed else lay, batch, contiguous)

    if torch.compiler.is_compiling():
        return build()
    per_layout = _INDEX_CACHE.setdefault(layout, {})
    key = (layout._version, causal, block_q, block_k, batch, contiguous, transposed)
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


def _choose(backend: str, q: Tensor, dropout_p: float, for_backward: bool) -> Backend:
    """The backend that runs this call: the router's choice for this head size, dropout and
    direction (see sparsekernels.ops.router)."""
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
@torch.library.custom_op("sparsekernels::block_sparse_attention", mutates_args=())
def _block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: Tensor,
                            attn_mask: Optional[Tensor], causal: bool, scale: float,
                            block_q: int, block_k: int, dropout_p: float, seed: int,
                            backend: str) -> tuple[Tensor, Tensor]:
    chosen = _choose(backend, q, dropout_p, for_backward=False)
    b = q.shape[0]
    mask = _mask4(attn_mask)
    if chosen is Backend.CPU:  # builds its block lists (causal included) in C++
        return _ext.op(OP, "cpu")(q, k, v, _layout4(layout), mask, causal, scale, block_q,
                                  block_k)
    if chosen is Backend.TRITON:
        idx, cnt = layout_index(layout, causal, block_q, block_k, b, contiguous=False)
        return _triton().forward(q, k, v, idx, cnt, mask, causal, scale, block_q, block_k,
                                 dropout_p, seed)
    if chosen is Backend.CUDA:
        idx, cnt = layout_index(layout, causal, block_q, block_k, b, contiguous=True)
        return _ext.op(OP, "cuda")(q, k, v, idx, cnt, mask, causal, scale, block_q, block_k)
    lay = _layout4(effective_layout(layout, causal, block_q, block_k))
    drop = _dropout_mask(seed, (b, q.shape[1], q.shape[2], k.shape[2]), dropout_p, q.device)
    out, stats = ref.block_sparse_attention(q, k, v, lay, (block_q, block_k), mask, causal,
                                            scale, drop, dropout_p)
    return out.contiguous(), stats.contiguous()


@_block_sparse_attention.register_fake
def _(q, k, v, layout, attn_mask, causal, scale, block_q, block_k, dropout_p, seed, backend):
    b, h, lq, _ = q.shape
    out = q.new_empty((b, h, lq, v.shape[-1]))
    stats = q.new_empty((b, h, 2, lq), dtype=stats_dtype(q.dtype))
    return out, stats


# --- backward ------------------------------------------------------------------------------
@torch.library.custom_op("sparsekernels::block_sparse_attention_backward", mutates_args=())
def _block_sparse_attention_backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
        layout: Tensor, attn_mask: Optional[Tensor], causal: bool, scale: float, block_q: int,
        block_k: int, dropout_p: float, seed: int, need_dmask: bool,
        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dscores): dscores [B, H, Lq, Lk] fp32 is the gradient of the additive
    mask before broadcasting (empty [0] unless need_dmask)."""
    chosen = _choose(backend, q, dropout_p, for_backward=True)
    b = q.shape[0]
    mask = _mask4(attn_mask)
    grad_out = grad_out.contiguous()
    empty = q.new_empty((0,), dtype=torch.float32)
    if chosen is Backend.CPU:
        dq, dk, dv, ds = _ext.op(OP + "_backward", "cpu")(
            grad_out, q, k, v, out, stats, _layout4(layout), mask, causal, scale, block_q,
            block_k, need_dmask)
        return dq, dk, dv, (ds if need_dmask else empty)
    if chosen is Backend.TRITON:
        kv_idx, kv_cnt = layout_index(layout, causal, block_q, block_k, b, contiguous=False)
        q_idx, q_cnt = layout_index(layout, causal, block_q, block_k, b, contiguous=False,
                                    transposed=True)
        dq, dk, dv, ds = _triton().backward(grad_out, q, k, v, out, stats, kv_idx, kv_cnt, q_idx,
                                            q_cnt, mask, causal, scale, block_q, block_k,
                                            dropout_p, seed, need_dmask)
        return dq, dk, dv, (ds if need_dmask else empty)
    lay = _layout4(effective_layout(layout, causal, block_q, block_k))
    drop = _dropout_mask(seed, (b, q.shape[1], q.shape[2], k.shape[2]), dropout_p, q.device)
    dq, dk, dv, ds = ref.block_sparse_attention_backward(grad_out, q, k, v, lay, (block_q, block_k),
                                                         mask, causal, scale, drop, dropout_p)
    return (dq.contiguous(), dk.contiguous(), dv.contiguous(),
            ds.float().contiguous() if need_dmask else empty)


@_block_sparse_attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, layout, attn_mask, causal, scale, block_q, block_k,
      dropout_p, seed, need_dmask, backend):
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    ds = (q.new_empty((b, h, lq, lk), dtype=torch.float32) if need_dmask
          else q.new_empty((0,), dtype=torch.float32))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds)


# --- autograd ------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    (q, k, v, layout, attn_mask, causal, scale, block_q, block_k, dropout_p, seed,
     backend) = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, layout, attn_mask)
    ctx.args = (causal, scale, block_q, block_k, dropout_p, seed, backend)
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
    causal, scale, block_q, block_k, dropout_p, seed, backend = ctx.args
    need_dmask = (attn_mask is not None and attn_mask.dtype != torch.bool
                  and ctx.needs_input_grad[4])
    dq, dk, dv, ds = torch.ops.sparsekernels.block_sparse_attention_backward(
        grad_out, q, k, v, out, stats, layout, attn_mask, causal, scale, block_q, block_k,
        dropout_p, seed, need_dmask, backend)
    dmask = _reduce_to(ds, ctx.mask_shape).to(ctx.mask_dtype) if need_dmask else None
    return dq, dk, dv, None, dmask, None, None, None, None, None, None, None


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
    lk = k.shape[2]
    if k.shape[:2] != (b, h) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"shape mismatch: q {list(q.shape)}, k {list(k.shape)}, v "
                         f"{list(v.shape)}; expected k [b, h, Lk, {d}] and v [b, h, Lk, dv] with "
                         f"b={b}, h={h}")
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
                         f"(optionally with a leading batch dim 1 or {b}) for q {list(q.shape)}, "
                         f"k {list(k.shape)} and block size {(bq, bk)}; got {list(layout.shape)}")
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


def prefers_dense(q: Tensor, layout: Tensor, dropout_p: float, backend: Backend) -> bool:
    """The router's choice for an all-true layout: dense SDPA (auto on the CPU)."""
    r = route(OP, q.device, q.dtype, backend, head_dim=q.shape[-1], dropout=dropout_p > 0)
    return r.dense_full_layout and bool(layout.all())


def _dense_sdpa(q, k, v, attn_mask, causal: bool, scale: float) -> Tensor:
    """The dense equivalent of an all-true layout, with this op's semantics: rows with no
    allowed key give zeros (SDPA gives NaN there)."""
    mask = attn_mask
    if causal and mask is not None:
        tril = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = (mask & tril) if mask.dtype == torch.bool else mask.masked_fill(~tril,
                                                                               float("-inf"))
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
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
    return out if dead is None else out.masked_fill(dead, 0.0)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: Tensor,
                           block_size=(64, 64), attn_mask: Optional[Tensor] = None,
                           causal: bool = False, scale: Optional[float] = None,
                           dropout_p: float = 0.0, backend: "Backend | str" = "auto") -> Tensor:
    """softmax(q k^T * scale + attn_mask) v over the (query block, key block) pairs in `layout`.

    q [B, H, Lq, D], k and v [B, H, Lk, D]; layout bool [(B,) H, ceil(Lq/bq), ceil(Lk/bk)].
    attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Lq, Lk].
    causal: top-left aligned like F.scaled_dot_product_attention(is_causal=True).
    scale: defaults to 1/sqrt(D). dropout_p: attention-probability dropout (training).
    Rows with no allowed key return zeros. backend: auto (on CPU an all-true layout runs as
    dense SDPA), triton, cuda, cpu or reference (SPARSEKERNELS_BACKEND overrides auto).
    """
    bq, bk = check_inputs(q, k, v, layout, block_size, attn_mask)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0.0 else 0
    backend = Backend.parse(backend)
    if prefers_dense(q, layout, dropout_p, backend):
        return _dense_sdpa(q, k, v, attn_mask, causal, scale)
    out, _ = torch.ops.sparsekernels.block_sparse_attention(
        q, k, v, layout, attn_mask, bool(causal), scale, bq, bk, float(dropout_p), seed,
        backend.value)
    return out
