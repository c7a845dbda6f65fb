"""bsr_linear and bsr_ffn in bf16 on the CPU: the AVX-512 BF16 kernels (bsr_linear_bf16.cpp,
bsr_ffn_bf16.cpp) where the CPU has them, and the fp32 conversion path they fall back to,
against float64 within twice torch's own bf16 error."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from sparsekernels import BlockSparseTensor
from sparsekernels.formats.block_sparse import inner_tensors
from sparsekernels.ops.bsr_ffn import activate
from sparsekernels.formats.functional import sparse_ffn, sparse_linear
from sparsekernels.ops.bsr_linear import pack
from sparsekernels.testing import assert_close_to_reference, random_block_mask
from tests.ops.isa_paths import PATHS, use_isa


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    return use_isa(request.param, monkeypatch, "bsr_linear", "avx512_bf16")


def weight(n, k, block=(32, 32), density=0.5, empty=False):
    grid = (n // block[0], k // block[1])
    mask = random_block_mask(grid, density)
    if empty and grid[0] > 1:
        mask[0] = False
    w = torch.randn(n, k, dtype=torch.float64) / k ** 0.5
    return BlockSparseTensor.from_dense(w, block, mask).to(torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 3, 5, 13, 97, 1025], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0], ids=lambda d: f"d{d}")
def test_forward_matches_reference(isa, tokens, density):
    w = weight(128, 192, density=density, empty=density == 0.5)
    x = torch.randn(tokens, 192, dtype=torch.bfloat16)
    bias = torch.randn(128, dtype=torch.bfloat16)
    y = sparse_linear(x, w, bias, backend="cpu")
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.double(), w.to_dense().double(), bias.double())
    assert_close_to_reference(y, ref, F.linear(x, w.to_dense(), bias), reduction=192)


@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 32), (128, 16), (16, 128)],
                         ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("tokens", [2, 61], ids=lambda t: f"T{t}")
def test_block_sizes_and_packed_blocks(isa, block, tokens):
    w = weight(256, 384, block, density=0.4)
    x = torch.randn(tokens, 384, dtype=torch.bfloat16)
    kernel = torch.ops.sparsekernels_C.bsr_linear_cpu
    values, crow, col = w.values, w.crow_indices, w.col_indices
    packed = kernel(x, values, crow, col, None, pack(values))
    ref = F.linear(x.double(), w.to_dense().double())
    assert_close_to_reference(packed, ref, F.linear(x, w.to_dense()), reduction=384)
    if tokens > 4:  # both ways run the tiled kernel: the same numbers
        assert torch.equal(packed, kernel(x, values, crow, col, None))


def test_packing_follows_the_cpu(isa):
    w = weight(64, 96)
    packed = pack(w.values)
    if isa == "native":  # k in pairs for vdpbf16ps
        assert packed.shape == (w.nnz_blocks, 16, 32, 2) and packed.dtype == torch.bfloat16
        assert torch.equal(packed, w.values.reshape(-1, 32, 16, 2).permute(0, 2, 1, 3))
    else:  # the fp32 conversion path's W.T blocks
        assert packed.shape == (w.nnz_blocks, 32, 32) and packed.dtype == torch.float32


def test_packed_of_the_other_path_is_refused(isa):
    w = weight(64, 96)
    x = torch.randn(8, 96, dtype=torch.bfloat16)
    native = w.values.reshape(-1, 32, 16, 2).permute(0, 2, 1, 3).contiguous()
    converted = w.values.float().transpose(1, 2).contiguous()
    wrong = converted if isa == "native" else native
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.sparsekernels_C.bsr_linear_cpu(x, w.values, w.crow_indices, w.col_indices, None,
                                                 wrong)


def test_gradients_reuse_the_backward_ops(isa):
    w = weight(96, 128, density=0.5)
    values = w.values.clone().requires_grad_(True)
    w = BlockSparseTensor(values, *inner_tensors(w)[1:], shape=w.shape)
    x = torch.randn(40, 128, dtype=torch.bfloat16, requires_grad=True)
    y = sparse_linear(x, w, None, backend="cpu")
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), g)
    xd = x.detach().double().requires_grad_(True)
    wd = w.to_dense().detach().double()
    (gxd,) = torch.autograd.grad(F.linear(xd, wd), xd, g.double())
    assert_close_to_reference(gx, gxd, (g @ w.to_dense().detach()), reduction=96)
    assert gv.shape == values.shape and torch.isfinite(gv.float()).all()


@pytest.mark.parametrize("tokens", [24, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("activation", ["gelu", "relu", "none"])
def test_fused_ffn_matches_reference(isa, tokens, density, activation):
    w1 = weight(256, 128, density=density, empty=density == 0.5)
    w2 = weight(128, 256, density=density)
    b1, b2 = torch.randn(256, dtype=torch.bfloat16), torch.randn(128, dtype=torch.bfloat16)
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    y = sparse_ffn(x, w1, b1, w2, b2, activation, backend="cpu")
    assert y.dtype == torch.bfloat16

    def composed(dtype):
        h = F.linear(x.to(dtype), w1.to_dense().to(dtype), b1.to(dtype))
        h = activate(h.double(), activation).to(dtype) if dtype != torch.float64 else activate(h, activation)
        return F.linear(h, w2.to_dense().to(dtype), b2.to(dtype))

    assert_close_to_reference(y, composed(torch.float64), composed(torch.bfloat16), reduction=256)


def test_opcheck_bf16(isa):
    w = weight(64, 96)
    x = torch.randn(30, 96, dtype=torch.bfloat16)
    opcheck(torch.ops.sparsekernels.bsr_linear, (x, *inner_tensors(w), None, "cpu"))
    opcheck(torch.ops.sparsekernels.bsr_linear_packed,
            (x, w.values, pack(w.values), w.crow_indices, w.col_indices, None))


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 32), (128, 16)],
                         ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("tokens", [1, 2, 5, 9, 16, 17], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_decode_on_the_blocks_a_sparse_linear_stores(isa, block, tokens, with_bias):
    """A bf16 SparseLinear keeps its blocks transposed in memory (W.T per block, as for fp32);
    up to 16 rows the kernel reads them as they are (nothing packed or copied per call), in
    the module's direct entry and through the op, with empty block rows."""
    from sparsekernels.nn import SparseLinear

    w = weight(256, 384, block, density=0.4, empty=True)
    bias = torch.randn(256, dtype=torch.bfloat16) if with_bias else None
    layer = SparseLinear.from_block_sparse(w, bias).eval()
    assert layer.values.transpose(1, 2).is_contiguous()  # the layout under test
    x = torch.randn(tokens, 384, dtype=torch.bfloat16)
    dense = layer.weight.to_dense()
    b = layer.bias
    ref = F.linear(x.double(), dense.double(), None if b is None else b.double())
    base = F.linear(x, dense, b)
    with torch.no_grad():
        assert_close_to_reference(layer(x), ref, base, reduction=384)
        assert_close_to_reference(layer(x.view(1, tokens, 384)), ref.view(1, tokens, 256),
                                  base.view(1, tokens, 256), reduction=384, name="3d")
    y = torch.ops.sparsekernels.bsr_linear(x, *layer.op_args(), b, "cpu")
    assert_close_to_reference(y, ref, base, reduction=384, name="op")


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 32), (128, 16), (16, 128)],
                         ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("tokens", [17, 61, 300], ids=lambda t: f"T{t}")
def test_prefill_on_the_blocks_a_sparse_linear_stores(isa, block, tokens):
    """Above 16 rows the tiled kernel reads the module's W.T blocks too: each column's blocks
    are paired for vdpbf16ps inside the kernel, nothing packed per call. The same numbers as
    the kernel on the caller's packing (same products, same order), and close to float64."""
    from sparsekernels.nn import SparseLinear

    w = weight(256, 384, block, density=0.4, empty=True)
    bias = torch.randn(256, dtype=torch.bfloat16)
    layer = SparseLinear.from_block_sparse(w, bias).eval()
    assert layer.values.transpose(1, 2).is_contiguous()  # the layout under test
    x = torch.randn(tokens, 384, dtype=torch.bfloat16)
    dense = layer.weight.to_dense()
    ref = F.linear(x.double(), dense.double(), bias.double())
    with torch.no_grad():
        y = layer(x)
    assert_close_to_reference(y, ref, F.linear(x, dense, bias), reduction=384)
    if isa == "native":  # (the fp32 conversion path may take another route per row count)
        kernel = torch.ops.sparsekernels_C.bsr_linear_cpu
        values, crow, col = layer.values, layer.crow_indices, layer.col_indices
        with torch.no_grad():
            assert torch.equal(y, kernel(x, values, crow, col, bias, pack(values)))


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (128, 32)],
                         ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("tokens", [1, 40, 257], ids=lambda t: f"T{t}")
def test_fused_ffn_on_the_blocks_sparse_linears_store(isa, block, tokens):
    """The fused FFN of two SparseLinear (W.T blocks as stored) against float64, and equal to
    the same op on packed copies of the blocks."""
    from sparsekernels.nn import SparseLinear

    w1 = weight(256, 128, block, density=0.5, empty=True)
    w2 = weight(128, 256, block, density=0.5)
    b1, b2 = torch.randn(256, dtype=torch.bfloat16), torch.randn(128, dtype=torch.bfloat16)
    l1 = SparseLinear.from_block_sparse(w1, b1).eval()
    l2 = SparseLinear.from_block_sparse(w2, b2).eval()
    assert l1.values.transpose(1, 2).is_contiguous()
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    ffn = torch.ops.sparsekernels_C.bsr_ffn_cpu
    args1 = (l1.values, l1.crow_indices, l1.col_indices, b1)
    args2 = (l2.values, l2.crow_indices, l2.col_indices, b2)
    with torch.no_grad():
        y = ffn(x, *args1, *args2, 256, "gelu")
        packed = ffn(x, *args1, *args2, 256, "gelu", pack(l1.values), pack(l2.values))
    d1, d2 = l1.weight.to_dense(), l2.weight.to_dense()

    def composed(dtype):
        h = F.linear(x.to(dtype), d1.to(dtype), b1.to(dtype))
        h = activate(h.double(), "gelu").to(dtype) if dtype != torch.float64 else activate(h, "gelu")
        return F.linear(h, d2.to(dtype), b2.to(dtype))

    assert_close_to_reference(y, composed(torch.float64), composed(torch.bfloat16), reduction=256)
    if isa == "native" and tokens > 16:  # (up to 16 rows the stored blocks take FMAs)
        assert torch.equal(y, packed)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 5, 23, 24, 97], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("blocks", [((32, 32), (32, 32)), ((16, 64), (64, 16)),
                                    ((128, 32), (32, 128))], ids=lambda b: f"{b[0]}-{b[1]}")
def test_gated_ffn_in_bf16(isa, threads, tokens, blocks):
    """bsr_gated_ffn in bf16 (Llama's MLP) on the blocks three SparseLinear store: both
    schedules (few rows split the hidden units over the threads, more take whole rows), any
    thread count, against float64 within twice torch's own bf16 error, and equal to the same
    op on packed copies of the blocks."""
    from sparsekernels.nn import SparseLinear

    bgu, bd = blocks
    gate = SparseLinear.from_block_sparse(weight(256, 128, bgu, density=0.5, empty=True),
                                          torch.randn(256, dtype=torch.bfloat16)).eval()
    up = SparseLinear.from_block_sparse(weight(256, 128, bgu, density=0.5)).eval()
    down = SparseLinear.from_block_sparse(weight(128, 256, bd, density=0.5),
                                          torch.randn(128, dtype=torch.bfloat16)).eval()
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    layers = (gate, up, down)
    stored = [t for w in layers for t in (*w.op_args(), w.bias)]
    packed = [t for w in layers for t in (w.values, pack(w.values), w.crow_indices,
                                          w.col_indices, w.bias)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = torch.ops.sparsekernels.bsr_gated_ffn(x, *stored, "silu", "cpu")
            p = torch.ops.sparsekernels.bsr_gated_ffn_packed(x, *packed, "silu")
    finally:
        torch.set_num_threads(old)

    def composed(dtype):
        def lin(v, w):
            b = None if w.bias is None else w.bias.to(dtype)
            return F.linear(v, w.weight.to_dense().to(dtype), b)
        h = F.silu(lin(x.to(dtype), gate)) * lin(x.to(dtype), up)
        return lin(h.to(dtype), down)

    assert y.dtype == torch.bfloat16 and y.shape == (tokens, 128)
    assert_close_to_reference(y, composed(torch.float64), composed(torch.bfloat16),
                              reduction=128 + 256)
    if isa == "native" and tokens > 16:  # (up to 16 rows the stored blocks take FMAs)
        assert torch.equal(y, p)
