"""The post-norm as a sparse kernel's epilogue: layer_norm(layer(x) + residual) in one call
(int8 Linear and FFN; bf16 Linear and FFN on AVX-512 BF16), bit for bit the unfused result
and close to the float64 reference; fuse_add_norm_ wires it into BERT-style models (the
attention output's dense, and the fused FFN through _FFNLink), and calls it cannot take run
unfused."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sparsekernels.nn import (QuantizedSparseLinear, SparseLinear, fuse_add_norm_,
                              unfuse_add_norm_)
from sparsekernels.nn.sparse_ffn import SparseFFN
from sparsekernels.ops import _ext
from sparsekernels.ops.add_layer_norm import add_layer_norm
from sparsekernels.ops.precision import cpu_isa
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from tests.ops.isa_paths import PATHS, use_isa
from tests.speedup.families import block_masks, build, output_of

K, HIDDEN, N = 128, 256, 128
ENTRIES = ("linear_add_norm_inference", "ffn_add_norm_inference",
           "int8_linear_add_norm_inference", "int8_ffn_add_norm_inference")


@pytest.fixture(autouse=True)
def _built():
    if _ext.direct("int8_linear_add_norm_inference") is None:
        pytest.skip("compiled CPU extension not built (make build)")


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    return use_isa(request.param, monkeypatch, "bsr_linear_int8", "avx512_vnni")


def no_epilogues(monkeypatch):
    """Make the epilogue entries missing: every call runs unfused."""
    direct = _ext.direct
    monkeypatch.setattr(_ext, "direct", lambda name: None if name in ENTRIES else direct(name))


def norm_of(width, dtype=torch.float32):
    norm = torch.nn.LayerNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def reference(y64, residual, norm):
    return F.layer_norm(y64 + residual.double(), y64.shape[-1:], norm.weight.double(),
                        norm.bias.double(), norm.eps)


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def sparse_linear(n, k, dtype, density=0.5):
    layer = SparseLinear.from_linear(torch.nn.Linear(k, n), (32, 32), sparsity=1 - density)
    return layer.to(dtype)


@pytest.mark.parametrize("rows", [1, 7, 40, 300], ids=lambda r: f"T{r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", ["auto", "w8a8"])
def test_int8_linear(isa, rows, dtype, scheme):
    layer = sparse_linear(N, K, torch.float32)
    q = QuantizedSparseLinear.from_sparse_linear(layer, scheme=scheme)
    norm = norm_of(N)
    x, residual = torch.randn(3, rows, K, dtype=dtype), torch.randn(3, rows, N, dtype=dtype)
    with torch.no_grad():
        got = q.add_norm_forward(x, residual, norm)
        unfused = add_layer_norm(q(x), residual, norm.weight, norm.bias, norm.eps)
        want = reference(q.to_linear(torch.float64)(x.double()), residual, norm)
    assert got is not None and got.dtype == dtype and got.shape == residual.shape
    assert torch.equal(got, unfused)
    # int8 weights (and activations in w8a8) against the float64 layer: the module's bound
    assert rel_err(got, want) <= (0.03 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("rows", [1, 40, 300], ids=lambda r: f"T{r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_ffn(isa, rows, dtype):
    from sparsekernels.nn.quantized_sparse_linear import quantized_ffn_forward

    model = torch.nn.Sequential(torch.nn.Linear(K, HIDDEN), torch.nn.GELU(),
                                torch.nn.Linear(HIDDEN, K))
    ffn = SparseFFN.from_linears(model[0], model[2], "gelu", (32, 32), sparsity=0.5)
    fc1 = QuantizedSparseLinear.from_sparse_linear(ffn.fc1, scheme="w8a8")
    fc2 = QuantizedSparseLinear.from_sparse_linear(ffn.fc2, scheme="w8a8")
    entry = _ext.direct("int8_ffn_add_norm_inference")
    norm = norm_of(K)
    x = torch.randn(2, rows, K, dtype=dtype)
    residual = torch.randn(2, rows, K, dtype=dtype)
    p1, c1 = fc1.packed(x)
    p2, c2 = fc2.packed(x)
    b1, b2 = fc1._buffers, fc2._buffers
    with torch.no_grad():
        got = entry(x, p1, c1, b1["scale"], b1["crow_indices"], b1["col_indices"], b1["bias"],
                    p2, c2, b2["scale"], b2["crow_indices"], b2["col_indices"], b2["bias"],
                    "gelu", K, residual, norm.weight, norm.bias, norm.eps)
        unfused = add_layer_norm(quantized_ffn_forward(fc1, fc2, "gelu", x), residual,
                                 norm.weight, norm.bias, norm.eps)
        w1, w2 = fc1.to_linear(torch.float64), fc2.to_linear(torch.float64)
        want = reference(w2(F.gelu(w1(x.double()))), residual, norm)
    assert torch.equal(got, unfused)
    assert rel_err(got, want) <= (0.03 if dtype == torch.float32 else 0.05)


needs_bf16 = pytest.mark.skipif("avx512_bf16" not in cpu_isa(),
                                reason="the bf16 epilogues run in the AVX-512 BF16 kernels")


@needs_bf16
@pytest.mark.parametrize("rows", [1, 12, 40, 300], ids=lambda r: f"T{r}")
def test_bf16_linear(rows):
    layer = sparse_linear(N, K, torch.bfloat16)
    norm = norm_of(N, torch.bfloat16)
    x, residual = (torch.randn(rows, w, dtype=torch.bfloat16) for w in (K, N))
    with torch.no_grad():
        got = layer.add_norm_forward(x, residual, norm)
        unfused = add_layer_norm(layer(x), residual, norm.weight, norm.bias, norm.eps)
        want = reference(F.linear(x.double(), layer.weight.to_dense().double(),
                                  layer.bias.double()), residual, norm)
    assert got is not None and torch.equal(got, unfused)
    assert rel_err(got, want) <= 0.05


@needs_bf16
@pytest.mark.parametrize("rows", [3, 300], ids=lambda r: f"T{r}")  # split units, row chunks
def test_bf16_ffn(rows):
    from sparsekernels.nn.sparse_ffn import ffn_forward

    model = torch.nn.Sequential(torch.nn.Linear(K, HIDDEN), torch.nn.GELU(),
                                torch.nn.Linear(HIDDEN, K))
    ffn = SparseFFN.from_linears(model[0], model[2], "gelu", (32, 32), sparsity=0.5)
    ffn = ffn.to(torch.bfloat16)
    norm = norm_of(K, torch.bfloat16)
    x, residual = (torch.randn(rows, w, dtype=torch.bfloat16) for w in (K, K))
    entry = _ext.direct("ffn_add_norm_inference")
    args = [t for layer in (ffn.fc1, ffn.fc2)
            for t in (layer.values, layer.crow_indices, layer.col_indices, layer.bias)]
    with torch.no_grad():
        got = entry(x, *args, "gelu", K, residual, norm.weight, norm.bias, norm.eps)
        unfused = add_layer_norm(ffn_forward(ffn.fc1, ffn.fc2, "gelu", x), residual,
                                 norm.weight, norm.bias, norm.eps)
        w1, w2 = (layer.weight.to_dense().double() for layer in (ffn.fc1, ffn.fc2))
        h = F.gelu(F.linear(x.double(), w1, ffn.fc1.bias.double()))
        want = reference(F.linear(h, w2, ffn.fc2.bias.double()), residual, norm)
    assert torch.equal(got, unfused)
    assert rel_err(got, want) <= 0.05


def test_calls_without_the_epilogue_run_unfused():
    layer = sparse_linear(N, K, torch.float32)
    norm = norm_of(N)
    x, residual = torch.randn(5, K), torch.randn(5, N)
    with torch.no_grad():
        assert layer.add_norm_forward(x, residual, norm) is None  # fp32: no epilogue kernel
    q = QuantizedSparseLinear.from_sparse_linear(layer)
    with torch.no_grad():
        assert q.add_norm_forward(x, torch.randn(5, N + 1), norm) is None  # residual's width
        assert q.add_norm_forward(x, torch.randn(4, N), norm) is None  # residual's rows
        assert q.add_norm_forward(x, residual.double(), norm) is None  # residual's dtype
    residual.requires_grad_(True)
    assert q.add_norm_forward(x, residual, norm) is None  # a gradient to record


def test_bad_norm_refused_before_anything_runs():
    q = QuantizedSparseLinear.from_sparse_linear(sparse_linear(N, K, torch.float32))
    x, residual = torch.randn(5, K), torch.randn(5, N)
    with torch.no_grad(), pytest.raises(RuntimeError, match="weight must be"):
        q.add_norm_forward(x, residual, norm_of(N + 2))
    with torch.no_grad(), pytest.raises(RuntimeError, match="eps must be"):
        norm = norm_of(N)
        norm.eps = float("nan")
        q.add_norm_forward(x, residual, norm)


def links(model):
    return [m for m in model.modules() if "_add_norm" in m.__dict__
            and m.__dict__["_add_norm"].ffn is not None]


def sped_up(dtype):
    model, dummy = build("bert")
    masks = block_masks(model, (32, 32), 0.5)
    ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(32, 32),
                 dtype=dtype).speedup_model()
    return model, dummy


@pytest.mark.parametrize("dtype", ["int8", torch.bfloat16], ids=["int8", "bf16"])
def test_bert_model_same_as_unfused(dtype, monkeypatch):
    model, dummy = sped_up(dtype)
    assert len(links(model)) == model.config.num_hidden_layers  # each FFN to its output norm
    with torch.no_grad():
        got = output_of(model, dummy)
        no_epilogues(monkeypatch)
        want = output_of(model, dummy)
    assert torch.equal(got, want)


def test_ffn_link_with_another_residual_and_after_unfusing():
    model, dummy = sped_up("int8")
    layer = model.bert.encoder.layer[0]
    x = torch.randn(2, 12, model.config.hidden_size)
    other = torch.randn_like(x)
    with torch.no_grad():
        ffn_out = layer.intermediate.dense.ffn_forward(x)
        norm = layer.output.LayerNorm
        want_x = add_layer_norm(ffn_out, x, norm.weight, norm.bias, norm.eps)
        want_other = add_layer_norm(ffn_out, other, norm.weight, norm.bias, norm.eps)
        h = layer.intermediate(x)  # normed by the kernel, handed over to layer.output
        assert torch.equal(h, want_x) and torch.equal(layer.output(h, x), want_x)
        h = layer.intermediate(x)
        assert torch.equal(layer.output(h, other), want_other)  # runs the FFN again
        unfuse_add_norm_(model)
        assert torch.equal(layer.intermediate(x), ffn_out)  # no norm once unfused
        assert not links(model)
        fuse_add_norm_(model)
        assert len(links(model)) == model.config.num_hidden_layers


def test_links_come_back_on_load(tmp_path, monkeypatch):
    model, dummy = sped_up("int8")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert len(links(loaded)) == model.config.num_hidden_layers
    with torch.no_grad():
        got = output_of(loaded, dummy)
        no_epilogues(monkeypatch)
        assert torch.equal(got, output_of(copy.deepcopy(model), dummy))
