"""QuantizedSparseLinear: conversion, numbers, state_dict, .to(), and the one way users reach
it (sparsify_ / ModelSpeedup with dtype=...), including the fused int8 FFN."""

import io

import pytest
import torch
from torch import nn

from sparsekernels import QuantizedSparseLinear, SparseLinear, sparsify_
from sparsekernels.nn import fuse_ffn_, unfuse_ffn_
from sparsekernels.nn.quantized_sparse_linear import (
    FusedQuantizedFFNInput,
    apply_dtype_,
)
from sparsekernels.ops import _ext
from sparsekernels.ops.reference import bsr_linear_int8 as ref
from sparsekernels.testing import random_block_mask

pytestmark = pytest.mark.skipif(not _ext.has_op("bsr_linear_int8", "cpu"),
                                reason="compiled CPU extension not built (make build)")


def sparse_layer(n=96, k=128, density=0.5, bias=True):
    linear = nn.Linear(k, n, bias=bias)
    mask = random_block_mask((n // 32, k // 32), density)
    return SparseLinear.from_linear(linear, (32, 32), mask=mask).eval()


def test_from_sparse_linear_quantizes_per_output_channel():
    sl = sparse_layer()
    ql = QuantizedSparseLinear.from_sparse_linear(sl)
    assert ql.values.dtype == torch.int8 and ql.scale.dtype == torch.float32
    assert ql.values.abs().max() <= 127 and ql.density == sl.density
    for name in ("crow_indices", "col_indices", "row_indices"):
        assert torch.equal(getattr(ql, name), getattr(sl, name))
    # each weight is within half a step of its channel's grid
    w = sl.weight.to_dense().double()
    wq = ql.to_linear(torch.float64).weight
    step = ql.scale.double()[:, None].expand_as(w)
    assert ((wq - w).abs() <= step / 2 + 1e-12).all()
    assert torch.equal(ql.to_sparse_linear().weight.to_dense(), ql.to_linear().weight)


@pytest.mark.parametrize("rows", [1, 7, 64], ids=lambda r: f"T{r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_matches_the_op_reference(rows, dtype):
    sl = sparse_layer()
    ql = QuantizedSparseLinear.from_sparse_linear(sl)
    x = torch.randn(2, rows, 128).to(dtype)
    with torch.no_grad():
        y = ql(x)
    assert y.dtype == dtype and y.shape == (2, rows, 96)
    scheme = "w8" if 2 * rows <= 16 else "w8a8"
    exact = ref.bsr_linear_int8(x.reshape(-1, 128), ql.values, ql.scale, ql.row_indices,
                                ql.col_indices, 96, ql.bias, scheme).reshape(2, rows, 96)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    # and close to the float layer it came from
    y32 = sl(x.float()).double()
    assert ((y.double() - y32).norm() / y32.norm()).item() < 0.03


def test_from_linear_with_an_element_mask():
    linear = nn.Linear(64, 64)
    mask = torch.zeros(64, 64)
    mask[:32, :32] = 1
    mask[40, 50] = 1  # one kept element keeps its block
    ql = QuantizedSparseLinear.from_linear(linear, (32, 32), mask=mask)
    assert ql.values.shape[0] == 2
    dense = ql.to_linear().weight
    assert (dense[mask == 0] == 0).all()


def test_state_dict_saves_and_reloads_into_another_layout():
    ql = QuantizedSparseLinear.from_sparse_linear(sparse_layer(density=0.7))
    buf = io.BytesIO()
    torch.save(ql.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()))
    assert state["values"].dtype == torch.int8 and state["scale"].dtype == torch.float32
    assert not any("pack" in k for k in state)
    other = QuantizedSparseLinear(128, 96, (32, 32), block_mask=torch.ones(3, 4, dtype=torch.bool))
    other.load_state_dict(state)
    x = torch.randn(20, 128)
    with torch.no_grad():
        assert torch.equal(other(x), ql(x))
    with pytest.raises(RuntimeError, match="int8 values"):
        other.load_state_dict({**state, "values": state["values"].float()})


@pytest.mark.parametrize("part", ["crow_indices", "col_indices"])
def test_a_damaged_index_is_refused_before_any_kernel_reads_it(part):
    ql = QuantizedSparseLinear.from_sparse_linear(sparse_layer(density=0.7))
    state = ql.state_dict()
    before = {k: v.clone() for k, v in ql.state_dict().items()}
    bad = state[part].clone()
    bad[-1] = 50000  # past the last block / column
    with pytest.raises(RuntimeError, match=part):
        ql.load_state_dict({**state, part: bad})
    assert all(torch.equal(before[k], v) for k, v in ql.state_dict().items())


def test_to_moves_but_keeps_scales_and_bias_float32():
    ql = QuantizedSparseLinear.from_sparse_linear(sparse_layer())
    scale = ql.scale.clone()
    ql.to(torch.bfloat16)
    assert ql.scale.dtype == torch.float32 and ql.bias.dtype == torch.float32
    assert torch.equal(ql.scale, scale) and ql.values.dtype == torch.int8
    ql.half()
    assert ql.scale.dtype == torch.float32


def test_packed_cache_follows_in_place_writes():
    ql = QuantizedSparseLinear.from_sparse_linear(sparse_layer())
    x = torch.randn(30, 128)
    with torch.no_grad():
        before = ql(x)
        ql.values.neg_()
        after = ql(x)
    torch.testing.assert_close(after - ql.bias, -(before - ql.bias), rtol=1e-5, atol=1e-4)


def test_bad_input_is_refused_with_the_fix():
    ql = QuantizedSparseLinear.from_sparse_linear(sparse_layer())
    with pytest.raises(ValueError, match="wrong input width"):
        ql(torch.randn(3, 64))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ql(torch.randn(3, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown int8 scheme"):
        QuantizedSparseLinear(128, 96, scheme="w4")
    with pytest.raises(ValueError, match="unsupported dtype"):
        apply_dtype_(nn.Sequential(), torch.float16)


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


@pytest.mark.parametrize("dtype", ["int8", torch.int8, torch.bfloat16, torch.float32])
def test_sparsify_with_dtype(dtype):
    model = mlp().eval()
    x = torch.randn(40, 64)
    ref_model = sparsify_(mlp().eval(), (32, 32), sparsity=0.5)
    ref_model.load_state_dict(sparsify_(model, (32, 32), sparsity=0.5).state_dict())
    model = sparsify_(mlp().eval(), (32, 32), sparsity=0.5)
    model.load_state_dict(ref_model.state_dict())
    converted = apply_dtype_(model, dtype)
    with torch.no_grad():
        y = model(x.to(torch.bfloat16) if dtype is torch.bfloat16 else x).float()
        y32 = ref_model(x)
    if dtype in ("int8", torch.int8):
        assert converted == ["0", "2"] and isinstance(model[0], QuantizedSparseLinear)
    tol = {torch.float32: 1e-6, torch.bfloat16: 0.03}.get(dtype, 0.03)
    assert ((y - y32).norm() / y32.norm()).item() <= tol


def test_sparsify_dtype_argument_converts_the_new_layers():
    model = sparsify_(mlp().eval(), (32, 32), sparsity=0.5, dtype="int8")
    assert [type(m).__name__ for m in model] == ["QuantizedSparseLinear", "GELU",
                                                 "QuantizedSparseLinear"]
    with pytest.raises(ValueError, match="unsupported dtype"):
        sparsify_(mlp(), (32, 32), sparsity=0.5, dtype="int4")


def tiny_bert():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        num_hidden_layers=2, vocab_size=100)
    return tf.BertModel(cfg, add_pooling_layer=False).eval()


def block_masks(model, density=0.5):
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "encoder" in name:
            grid = (m.out_features // 32, m.in_features // 32)
            keep = random_block_mask(grid, density)
            mask = keep.repeat_interleave(32, 0).repeat_interleave(32, 1).float()
            masks[name] = {"weight": mask}
    return masks


def test_model_speedup_int8_fuses_saves_and_reloads(tmp_path):
    from sparsekernels.speedup import ModelSpeedup
    from sparsekernels.speedup.io import load_model, save_model

    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 24))
    masks = block_masks(model)
    fp32 = ModelSpeedup(tiny_bert(), {"input_ids": ids}, masks, mode="kernel").speedup_model()
    int8 = ModelSpeedup(model, {"input_ids": ids}, masks, mode="kernel",
                        dtype="int8").speedup_model()
    layers = [m for m in int8.modules() if isinstance(m, QuantizedSparseLinear)]
    assert len(layers) == 12 and not any(isinstance(m, SparseLinear) for m in int8.modules())
    assert sum(isinstance(m, FusedQuantizedFFNInput) for m in int8.modules()) == 2
    with torch.no_grad():
        y = int8(input_ids=ids)[0]
        y32 = fp32(input_ids=ids)[0]
    assert ((y - y32).norm() / y32.norm()).item() < 0.05
    save_model(int8, tmp_path / "int8")
    loaded = load_model(tmp_path / "int8", model=tiny_bert())
    assert sum(isinstance(m, FusedQuantizedFFNInput) for m in loaded.modules()) == 2
    short = ids[:1, :8]  # 8 rows: weight-only layers, which the fused FFN runs one by one
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids)[0], y)
        y_short = loaded(input_ids=short)[0]
    assert unfuse_ffn_(loaded) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids)[0], y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(input_ids=short)[0], y_short, rtol=1e-5, atol=1e-5)
    assert all(v.startswith("fused") for v in fuse_ffn_(loaded).values())


def test_model_speedup_int8_quantizes_the_unpruned_layer_linears_too(tmp_path):
    """In int8 the layers' Linears without a mask (here the attention's) are stored whole
    and quantized with the pruned ones, in auto mode as in kernel mode; nothing else is."""
    from sparsekernels.speedup import ModelSpeedup
    from sparsekernels.speedup.io import load_model, save_model

    ids = torch.randint(0, 100, (2, 24))
    for mode in ("auto", "kernel"):
        model = tiny_bert()
        reference = tiny_bert().double()
        masks = {k: v for k, v in block_masks(model, density=0.25).items() if ".attention." not in k}
        for name, m in masks.items():
            with torch.no_grad():
                reference.get_submodule(name).weight.mul_(m["weight"].double())
        speedup = ModelSpeedup(model, {"input_ids": ids}, masks, mode=mode, dtype="int8")
        speedup.speedup_model()
        quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedSparseLinear)}
        assert len(quantized) == 12, mode
        assert all(quantized[n].density == 1.0 for n in quantized if ".attention." in n)
        if mode == "kernel":  # auto resized the FFNs first: their density changed
            assert all(quantized[n].density == masks[n]["weight"].mean().item() for n in masks)
        assert any("stored whole" in note for note in speedup.report.notes)
        with torch.no_grad():
            y = model(input_ids=ids)[0]
            want = reference(input_ids=ids)[0]
        assert ((y.double() - want).norm() / want.norm()).item() < 0.05, mode
    save_model(model, tmp_path / "int8")
    loaded = load_model(tmp_path / "int8", model=tiny_bert())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids)[0], y)


def test_model_speedup_bf16_casts_the_model():
    from sparsekernels.speedup import ModelSpeedup

    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 24))
    ModelSpeedup(model, {"input_ids": ids}, block_masks(model), mode="kernel",
                 dtype=torch.bfloat16).speedup_model()
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert sparse and all(m.values.dtype == torch.bfloat16 for m in sparse)
    with torch.no_grad():
        assert model(input_ids=ids)[0].dtype == torch.bfloat16


def test_made_and_called_in_inference_mode():
    dense = nn.Linear(128, 96)
    x = torch.randn(5, 128)
    with torch.inference_mode():
        ql = QuantizedSparseLinear.from_linear(dense, (32, 32), sparsity=0.5)
        y1 = ql(x)
        with torch.no_grad():
            ql.values.mul_(-1)  # in place, inside inference mode: no version counter
        y2 = ql(x)
    # negated weights: y2 = bias - (y1 - bias), so a stale pack would show
    torch.testing.assert_close(y2, 2 * ql.bias - y1, rtol=1e-4, atol=1e-4)


class Passthrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(1, 128), (3, 128), (2, 9, 128), (17, 128)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_inference_skips_the_dispatcher_with_the_same_result(monkeypatch, shape, dtype):
    """An eager call that needs no gradient runs a direct C++ entry on the cached packed
    blocks (the op's dispatch costs as much as a decode kernel): the plain one, or above
    W8_MAX_ROWS rows the one on shared quantized rows; its result is the op's, bit for bit,
    and under a torch function mode (which must see the op) the op runs."""
    import sparsekernels.nn.quantized_sparse_linear as qsl

    ql = QuantizedSparseLinear.from_sparse_linear(sparse_layer())
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        want = torch.ops.sparsekernels.bsr_linear_int8(x, *ql.op_args(x), ql.scheme,
                                                       ql.backend.value)
    calls = []

    def spy(factory):
        entry = factory()
        assert entry is not None

        def make():
            def call(*args):
                calls.append(args[0].shape)
                return entry(*args)
            return call
        return make

    monkeypatch.setattr(qsl, "direct_int8_linear", spy(qsl.direct_int8_linear))
    monkeypatch.setattr(qsl, "direct_int8_linear_quantized",
                        spy(qsl.direct_int8_linear_quantized))
    with torch.no_grad():
        got = ql(x)
        assert calls == [x.shape] and torch.equal(got, want)
        with Passthrough():
            assert torch.equal(ql(x), want)
    assert len(calls) == 1
    with torch.inference_mode():
        assert torch.equal(ql(x), want) and len(calls) == 2


def qkv_layers(k=256, n=128, density=0.4):
    """Three int8 layers reading one input, as an attention's q, k and v projections do."""
    return [QuantizedSparseLinear.from_sparse_linear(sparse_layer(n, k, density)) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layers_reading_one_input_share_its_quantization(dtype):
    """Above W8_MAX_ROWS rows (int8 activations) the layers that read the very same tensor
    one after another quantize it once; each result is what the op gives on its own, bit for
    bit, and the shared codes and scales are the reference's rule's, bit for bit."""
    import sparsekernels.ops.bsr_linear_int8 as bli

    layers = qkv_layers()
    x = torch.randn(3, 40, 256).to(dtype)
    with torch.no_grad():
        got = [layer(x) for layer in layers]
        entry = bli._last_quantized[0]
        assert entry is not None and entry[0]() is x  # quantized once, kept for this x
        for layer, y in zip(layers, got):
            want = torch.ops.sparsekernels.bsr_linear_int8(x, *layer.op_args(x), "w8a8", "auto")
            assert torch.equal(y, want)
        q, xs, xz = entry[5]  # u8 codes, scales, zero points
        codes, scale = ref.quantize_rows(x.reshape(-1, 256))  # codes minus zero points
        assert torch.equal((q.to(torch.int32) - xz[:, None]).float(), codes)
        assert torch.equal(xs, scale)


def test_shared_quantization_never_serves_stale_codes():
    """The codes are reused only for the same tensor, unchanged: an in-place write, another
    tensor with the same shape, a view of the same memory and inference tensors (no version
    counter) are quantized afresh; every result equals a call on a fresh copy."""
    layers = qkv_layers()
    x = torch.randn(2, 30, 256)

    def fresh(layer, t):
        return layer(t.detach().clone())

    with torch.no_grad():
        layers[0](x)
        x.mul_(-3.0)  # in place, between two layers that read it
        assert torch.equal(layers[1](x), fresh(layers[1], x))
        x2 = torch.randn(2, 30, 256)
        assert torch.equal(layers[2](x2), fresh(layers[2], x2))
        view = x.view(60, 256)  # the same memory, another tensor
        layers[0](x)
        x[0, 0, 0] = 1e3  # through the view's base: the version counter is shared
        assert torch.equal(layers[1](view), fresh(layers[1], view))
        assert torch.equal(layers[2](x), fresh(layers[2], x))
    with torch.inference_mode():
        xi = torch.randn(2, 30, 256)
        assert torch.equal(layers[0](xi), fresh(layers[0], xi))
        xi.add_(1.0)
        assert torch.equal(layers[1](xi), fresh(layers[1], xi))


def test_quantized_rows_entry_refuses_rows_that_are_not_xs():
    """The entry that runs a layer on quantized rows checks them against x before any kernel
    reads them (they may come from a cache): wrong row count, width, dtype or layout."""
    import sparsekernels.ops.bsr_linear_int8 as bli

    layer = qkv_layers()[0]
    x = torch.randn(20, 256)
    q, xs, xz = _ext.direct("int8_quantize_rows")(x, 256)
    packed, comp = layer.packed(x)
    b = layer._buffers
    run = bli.direct_int8_linear_quantized()

    def call(*rows, t=x):
        return run(t, *rows, packed, comp, b["scale"], b["crow_indices"], b["col_indices"],
                   b["bias"], 256, None)

    assert torch.equal(call(q, xs, xz), layer(x.clone()))
    for bad, match in (((q[:19], xs, xz), "not x's rows"),
                       ((q.to(torch.int8), xs, xz), "uint8"),
                       ((q.t().contiguous().t(), xs, xz), "contiguous"),
                       ((q, xs[:19], xz), "float32 scales"),
                       ((q, xs, xz.float()), "int32 zero points")):
        with pytest.raises(RuntimeError, match=match):
            call(*bad)
    assert call(q, xs, xz, t=torch.randn(20, 128)) is None  # an x of another width: not taken
