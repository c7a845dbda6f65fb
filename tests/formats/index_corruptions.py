"""Ways to damage a block-sparse index or its blocks. Each index array is fully determined
by the set of stored (row, col) blocks that the other arrays describe, so changing any ONE
array in any way gives an invalid matrix: every variant here must be refused."""

from __future__ import annotations

import random

import torch


def _set(t: torch.Tensor, i: int, value: int) -> torch.Tensor:
    out = t.clone()
    out[i] = value
    return out


def _changed(original: torch.Tensor, variants):
    return [(label, v) for label, v in variants
            if not (v.dtype == original.dtype and v.shape == original.shape
                    and torch.equal(v, original))]


def damaged_index(t: torch.Tensor, rng: random.Random, contiguous_only: bool = False):
    """[(label, damaged copy)] of a 1-D int32 index array: out of range, negative, +-1,
    unsorted, duplicated, reversed, zeroed, wrong length, wrong dtype, wrong rank."""
    n = t.numel()
    out = []
    if n:
        i = rng.randrange(n)
        for label, value in (("50000", 50000), ("int32 max", 2**31 - 1), ("-1", -1),
                             ("int32 min", -2**31), ("+1", int(t[i]) + 1), ("-1 step", int(t[i]) - 1)):
            out.append((f"[{i}] = {label}", _set(t, i, value)))
    if n >= 2:
        differ = (t[1:] != t[:-1]).nonzero().flatten()
        if differ.numel():
            j = int(differ[rng.randrange(differ.numel())])
            swapped = t.clone()
            swapped[j], swapped[j + 1] = t[j + 1].clone(), t[j].clone()
            out.append((f"swap [{j}] and [{j + 1}]", swapped))
            out.append((f"[{j + 1}] = [{j}] (duplicate)", _set(t, j + 1, int(t[j]))))
        out.append(("reversed", t.flip(0)))
    out.append(("all zero", torch.zeros_like(t)))
    out.append(("one more entry", torch.cat([t, t[-1:] if n else t.new_zeros(1)])))
    if n:
        out.append(("one entry less", t[:-1].clone()))
        out.append(("empty", t[:0].clone()))
    for dtype in (torch.int64, torch.int16, torch.float32, torch.uint8):
        out.append((f"as {dtype}", t.to(dtype)))
    out.append(("2-D [1, n]", t.reshape(1, -1).clone()))
    if not contiguous_only and n >= 1:
        out.append(("non-contiguous", torch.stack([t, t], 1)[:, 0]))
    return _changed(t, out)


def damaged_values(v: torch.Tensor, in_memory: bool):
    """[(label, damaged copy)] of the stored blocks [nnz, bm, bk]: a block more or less, no
    blocks, another rank or block size, a dtype the kernels do not take (in memory) or not
    the model's (in a file)."""
    nnz, bm, bk = v.shape
    out = [("one block more", torch.cat([v, v.new_zeros(1, bm, bk)])),
           ("2-D [nnz, bm * bk]", v.reshape(nnz, bm * bk).clone()),
           ("blocks twice as tall", v.repeat(1, 2, 1)),
           ("blocks of 8x8", v.new_zeros(nnz * 4, 8, 8) if nnz else v.new_zeros(1, 8, 8)),
           ("as int32", v.to(torch.int32))]
    if nnz:
        out += [("one block less", v[:-1].clone()), ("no blocks", v[:0].clone())]
    if not in_memory:  # a valid dtype, but not the one the model has
        out += [("as float64", v.double()), ("as float16", v.half())]
    return _changed(v, out)
