"""The bf16 fused FFNs on the blocks as SparseLinear stores them on the CPU (W.T blocks, paired
for vdpbf16ps inside the kernel) give what they give on blocks packed by the caller, bit for
bit, in every schedule above the decode rows: the threads splitting the units, one row chunk
a thread, and several row chunks a thread, where a thread's first chunk pairs the blocks for
its later ones; on 1 and 2 threads; and with only some layers stored (the others packed). (Up
to 16 rows the stored blocks take FMAs on widened weights instead: not the pairs' rounding.)"""

import pytest
import torch

from sparsekernels import BlockSparseTensor
from sparsekernels.ops import _ext
from sparsekernels.ops.bsr_linear import pack
from sparsekernels.testing import random_block_mask

K, HIDDEN, N = 256, 768, 192
BLOCK = (32, 32)


def need():
    if not _ext.has_op("bsr_gated_ffn", "cpu"):
        pytest.skip("compiled CPU extension not built (make build)")


def layer(out_features, in_features, density):
    """(values as SparseLinear stores them on the CPU, the caller's packing, crow, col, bias)."""
    mask = random_block_mask((out_features // BLOCK[0], in_features // BLOCK[1]), density)
    mask[0, 0] = True  # never an empty layer
    w = BlockSparseTensor.from_dense(torch.randn(out_features, in_features) / in_features ** 0.5,
                                     BLOCK, mask).to(torch.bfloat16)
    stored = w.values.transpose(1, 2).contiguous().transpose(1, 2)  # nn.sparse_linear.lay_out
    assert torch.equal(stored, w.values)
    return stored, pack(w.values), w.crow_indices, w.col_indices, torch.randn(out_features)


def run(x, layers, activation, packed_mask):
    """The fused op on `layers` (two: plain FFN, three: gated), layer i packed by the caller
    where packed_mask[i]."""
    args, packs = [], []
    for (stored, packed, crow, col, bias), p in zip(layers, packed_mask):
        args += [stored, crow, col, bias.to(torch.bfloat16)]
        packs.append(packed if p else None)
    if len(layers) == 2:
        return torch.ops.sparsekernels_C.bsr_ffn_cpu(x, *args, HIDDEN, activation, *packs)
    return torch.ops.sparsekernels_C.bsr_gated_ffn_cpu(x, *args, activation, *packs)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [20, 40, 150, 700], ids=lambda t: f"T{t}")
def test_stored_blocks_give_the_packed_result(gated, threads, tokens):
    need()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = [layer(HIDDEN, K, 0.4)] + ([layer(HIDDEN, K, 0.3)] if gated else [])
        layers = first + [layer(N, HIDDEN, 0.35)]
        x = torch.randn(tokens, K).to(torch.bfloat16)
        activation = "silu" if gated else "gelu"
        want = run(x, layers, activation, [True] * len(layers))
        assert torch.isfinite(want.float()).all() and want.abs().sum() > 0
        # one layer packed by the caller, the others stored (before any call that stores
        # every layer, so no buffer holds these layers' pairs from an earlier call)
        for i in range(len(layers)):
            mixed = [j == i for j in range(len(layers))]
            assert torch.equal(run(x, layers, activation, mixed), want), f"layer {i} packed"
        assert torch.equal(run(x, layers, activation, [False] * len(layers)), want)
    finally:
        torch.set_num_threads(old)
