"""QuantizedSparseLinear.out_dtype: an int8 layer writes float32 or bfloat16 whatever its
input's dtype (one rounding of the fp32 accumulator), on the direct entries, the dispatched op
and the post-norm epilogue; ModelSpeedup's int8 mode with attention in bf16 products makes the
attention's q / k / v write bf16 and o write float32 (attention.bf16_projections_)."""

import copy

import pytest
import torch

from sparsekernels.nn import QuantizedSparseLinear, SparseLinear
from sparsekernels.ops import _ext
from sparsekernels.ops.add_layer_norm import add_layer_norm
from tests.ops.isa_paths import PATHS, use_isa

K, N = 128, 96


@pytest.fixture(autouse=True)
def _built():
    if _ext.direct("int8_linear_inference") is None:
        pytest.skip("compiled CPU extension not built (make build)")


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    return use_isa(request.param, monkeypatch, "bsr_linear_int8", "avx512_vnni")


def layer(scheme="auto"):
    torch.manual_seed(0)
    sparse = SparseLinear.from_linear(torch.nn.Linear(K, N), (32, 32), sparsity=0.5)
    return QuantizedSparseLinear.from_sparse_linear(sparse, scheme=scheme)


class Dispatched(torch.overrides.TorchFunctionMode):
    """Any mode sends the module through the op's dispatcher instead of the direct entry."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [1, 7, 300], ids=lambda r: f"T{r}")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x32", "x16"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["o32", "o16"])
@pytest.mark.parametrize("scheme", ["auto", "w8a8"])
def test_output_dtype_whatever_the_input(isa, rows, x_dtype, out_dtype, scheme):
    plain = layer(scheme)
    q = copy.deepcopy(plain).set_output_dtype(out_dtype)
    x = torch.randn(2, rows, K, dtype=x_dtype)
    with torch.no_grad():
        y, p = q(x), plain(x)
        with Dispatched():
            y_op = q(x)
        want = q.to_linear(torch.float64)(x.double())
    assert y.dtype == out_dtype and y_op.dtype == out_dtype and y.shape == (2, rows, N)
    if out_dtype == x_dtype:
        assert torch.equal(y, p)
    elif out_dtype == torch.bfloat16:  # the fp32 result, rounded once
        assert torch.equal(y, p.bfloat16())
    else:  # the unrounded result the bf16 output rounds
        assert torch.equal(y.bfloat16(), p)
    # the dispatched op computes in x's dtype, then converts
    assert torch.equal(y_op, p.to(out_dtype))
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err <= (0.03 if x_dtype == out_dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("rows", [1, 300], ids=lambda r: f"T{r}")
def test_add_norm_writes_the_output_dtype(isa, rows):
    """bf16 input, float32 residual stream: the epilogue adds and normalizes in float32, as
    the layer followed by the op does, bit for bit; without out_dtype the residual's dtype
    does not fit, and the call is left to the unfused path."""
    q = layer().set_output_dtype(torch.float32)
    norm = torch.nn.LayerNorm(N)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        x, residual = torch.randn(3, rows, K).bfloat16(), torch.randn(3, rows, N)
        got = q.add_norm_forward(x, residual, norm)
        unfused = add_layer_norm(q(x), residual, norm.weight, norm.bias, norm.eps)
        assert got is not None and got.dtype == torch.float32
        assert torch.equal(got, unfused)
        assert q.set_output_dtype(None).add_norm_forward(x, residual, norm) is None


def test_bad_output_dtypes_refused_and_a_cast_resets_it():
    q = layer()
    with pytest.raises(ValueError, match="out_dtype"):
        q.set_output_dtype(torch.float16)
    entry = _ext.direct("int8_linear_inference")
    packed, comp = q.packed(torch.zeros(1, K))
    b = q._buffers
    with pytest.raises(RuntimeError, match="float32 or bfloat16 outputs"):
        entry(torch.randn(4, K), packed, comp, b["scale"], b["crow_indices"],
              b["col_indices"], b["bias"], "w8a8", K, 16, torch.float16)
    q.set_output_dtype(torch.bfloat16)
    assert "out_dtype=torch.bfloat16" in repr(q)
    q.to(torch.bfloat16)  # the activations follow the cast
    assert q.out_dtype is None


def projection_dtypes(model):
    return {n: m.out_dtype for n, m in model.named_modules()
            if type(m) is QuantizedSparseLinear and m.out_dtype is not None}


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_int8_attention_projections(family, precision, tmp_path):
    """bert: every attention's q / k / v write bf16 and o float32, recorded, kept by save /
    load (same output bit for bit), undone by set_fp32_precision_("ieee"); within about
    bf16's rounding of the model without it. qwen2 (rotary embeddings, a cache): untouched."""
    from sparsekernels.attention import set_fp32_precision_
    from sparsekernels.speedup import ModelSpeedup, load_model, save_model
    from tests.speedup.families import block_masks, build, output_of

    torch.manual_seed(0)
    model, dummy = build(family)
    masks = block_masks(model, (16, 16), 0.5)
    s = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16), dtype="int8",
                     attention_fp32_precision=precision)
    s.speedup_model()
    found = projection_dtypes(model)
    recorded = {n: c["dtype"] for n, cs in s.structure.items() for c in cs
                if c["op"] == "output_dtype"}
    assert recorded == {n: str(d).replace("torch.", "") for n, d in found.items()}
    if family == "qwen2":
        assert not found
        return
    assert found and set(found.values()) == {torch.bfloat16, torch.float32}
    assert sum(d == torch.float32 for d in found.values()) * 3 == \
        sum(d == torch.bfloat16 for d in found.values())
    with torch.no_grad():
        fast = output_of(model, dummy)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert projection_dtypes(loaded) == found
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), fast)
        set_fp32_precision_(model, precision)  # the precision alone: fp32 projections
        for m in model.modules():
            if type(m) is QuantizedSparseLinear:
                m.set_output_dtype(None)
        products_only = output_of(model, dummy)
    err = ((fast - products_only).norm() / products_only.norm()).item()
    assert err < 1e-2
    set_fp32_precision_(loaded, "ieee")
    assert not projection_dtypes(loaded)


def test_output_dtype_records_checked():
    from sparsekernels.speedup.surgery import validate_structure
    from tests.speedup.families import build

    model, _ = build("bert")
    name = next(n for n, m in model.named_modules() if n.endswith("attention.self.query"))
    sparse = {"op": "sparse_linear", "in_features": 32, "out_features": 32,
              "block_size": [16, 16], "bias": True}
    with pytest.raises(ValueError, match="quantize_int8 change must come first"):
        validate_structure(model, {name: [sparse, {"op": "output_dtype", "dtype": "bfloat16"}]})
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        validate_structure(model, {name: [sparse, {"op": "quantize_int8"},
                                          {"op": "output_dtype", "dtype": "float16"}]})
