"""SparseFFN and fuse_ffn_: the fused block-sparse FFN as a module and inside transformers
models (every family), against float64 / the masked model; training; save and load."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

from sparsekernels.nn import SparseFFN, SparseLinear, fuse_ffn_, unfuse_ffn_
from sparsekernels.nn import sparse_ffn
from sparsekernels.nn.sparse_ffn import FusedFFNInput, FusedFFNOutput
from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from sparsekernels.testing import assert_close_to_reference
from tests.speedup.families import FAMILIES, apply_masks, block_masks, build, output_of

BACKENDS = ["reference", "cpu"]


def need(backend):
    if backend == "cpu" and not _ext.has_op("bsr_ffn", "cpu"):
        pytest.skip("compiled CPU extension (with bsr_ffn) not built (make build)")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_sparse_ffn_equals_pruned_dense_ffn_and_trains(backend, activation):
    need(backend)
    fc1, fc2 = nn.Linear(64, 256), nn.Linear(256, 64)
    ffn = SparseFFN.from_linears(fc1, fc2, activation, (16, 32), sparsity=0.6, backend=backend)
    assert isinstance(ffn.fc1, SparseLinear) and ffn.fc1.density == pytest.approx(0.4, abs=0.02)
    x = torch.randn(3, 29, 64)
    y = ffn(x)
    d1, d2 = ffn.fc1.to_linear().double(), ffn.fc2.to_linear().double()
    act = F.gelu if activation == "gelu" else F.relu
    ref = d2(act(d1(x.double())))
    base = ffn.fc2.to_linear()(act(ffn.fc1.to_linear()(x)))
    assert_close_to_reference(y, ref, base, reduction=64 + 256)
    # training: the stored blocks of both layers and the biases get the dense gradient
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    for sparse, dense in ((ffn.fc1, d1), (ffn.fc2, d2)):
        expect = SparseLinear.from_linear(nn.Linear(sparse.in_features, sparse.out_features),
                                          sparse.block_size, mask=sparse.to_linear().weight != 0)
        blocks = torch.zeros_like(sparse.values, dtype=torch.float64)
        dense_grad = dense.weight.grad
        bm, bk = sparse.block_size
        for e, (r, c) in enumerate(zip(sparse.row_indices.tolist(), sparse.col_indices.tolist())):
            blocks[e] = dense_grad[r * bm:(r + 1) * bm, c * bk:(c + 1) * bk]
        assert expect.values.shape == sparse.values.shape
        assert_close_to_reference(sparse.values.grad, blocks, reduction=3 * 29, factor=8,
                                  name="values grad")
        assert_close_to_reference(sparse.bias.grad, dense.bias.grad, reduction=3 * 29, factor=8,
                                  name="bias grad")


def test_sparse_ffn_refuses_bad_pairs_before_converting():
    fc1, fc2 = nn.Linear(64, 256), nn.Linear(256, 64)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        SparseFFN.from_linears(fc1, fc2, "swish")
    with pytest.raises(TypeError, match="SparseLinear.from_linear"):
        SparseFFN(fc1, fc2)
    a = SparseLinear.from_linear(fc1, (16, 16), sparsity=0.5)
    with pytest.raises(ValueError, match="pass the FFN's two layers in order"):
        SparseFFN(a, a)
    b = SparseLinear.from_linear(fc2, (16, 16), sparsity=0.5, backend="reference")
    with pytest.raises(ValueError, match=r"different backends \(auto, reference\)"):
        SparseFFN(a, b)


def test_torch_compile_same_output():
    ffn = SparseFFN.from_linears(nn.Linear(64, 128), nn.Linear(128, 64), "gelu", (32, 32),
                                 sparsity=0.5, backend="reference")
    x = torch.randn(4, 64)
    eager = ffn(x)
    compiled = torch.compile(ffn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    compiled(x).sum().backward()
    assert ffn.fc1.values.grad is not None and ffn.fc2.values.grad is not None


# --- inside transformers models ----------------------------------------------------------
def t5_v1_0():
    """T5 with the original ReLU FFN (wi, act, dropout, wo): fusable, unlike v1.1's gated."""
    cfg = tf.T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                      num_decoder_layers=2, feed_forward_proj="relu", decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, vocab_size=96)
    ids = torch.randint(3, 96, (2, 12))
    return tf.T5ForConditionalGeneration(cfg).eval(), {"input_ids": ids,
                                                       "decoder_input_ids": ids[:, :7]}


FUSED_PER_FAMILY = {"bert": 2, "roberta": 2, "gpt2": 2, "bart": 4, "t5": 4, "vit": 2,
                    "t5-relu": 4}


def kernel_model(family, backend="cpu"):
    model, dummy = t5_v1_0() if family == "t5-relu" else build(family)
    masks = block_masks(model, (16, 16), 0.4)
    reference = output_of(apply_masks(copy.deepcopy(model), masks), dummy)
    speedup = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16),
                           backend=backend)
    return speedup.speedup_model(), dummy, reference, speedup.report


@pytest.mark.parametrize("family", FAMILIES + ["t5-relu"])
def test_kernel_mode_fuses_ffns_and_matches_the_masked_model(family, monkeypatch):
    need("cpu")
    calls = []
    # the fused forwards' entries: the op, the CPU inference route (which runs the op's
    # implementation directly when no gradient is needed) and the extension's direct entry
    for owner, name in ((torch.ops.sparsekernels, "bsr_ffn"),
                        (torch.ops.sparsekernels, "bsr_gated_ffn"),
                        (sparse_ffn, "ffn_packed"), (sparse_ffn, "gated_ffn_packed")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real: calls.append(1) or real(*a),
                            raising=False)
    for getter in ("direct_ffn", "direct_gated_ffn"):
        real = getattr(sparse_ffn, getter)()
        if real is not None:
            monkeypatch.setattr(sparse_ffn, getter,
                                lambda real=real: lambda *a: calls.append(1) or real(*a))
    model, dummy, reference, report = kernel_model(family)
    fused = [k for k, v in report.fused_ffn.items() if v.startswith("fused")]
    assert len(fused) == FUSED_PER_FAMILY[family], report.fused_ffn
    if family == "t5":
        assert all("gated" in v for v in report.fused_ffn.values()) and report.fused_ffn
    calls.clear()
    with torch.no_grad():
        out = output_of(model, dummy)
    assert len(calls) == len(fused)  # every fused FFN ran as one op
    assert rel_err(out, reference) <= 1e-4
    # names and parameters unchanged: the state_dict is the unfused model's
    plain = copy.deepcopy(model)
    assert unfuse_ffn_(plain) == len(fused)
    assert list(plain.state_dict()) == list(model.state_dict())
    assert not any(isinstance(m, (FusedFFNInput, FusedFFNOutput)) for m in plain.modules())
    with torch.no_grad():
        assert rel_err(output_of(plain, dummy), out) <= 1e-5


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_fused_model_saves_and_loads_fused(family, tmp_path):
    need("cpu")
    model, dummy, _, _ = kernel_model(family)
    with torch.no_grad():
        expected = output_of(model, dummy)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert sum(isinstance(m, FusedFFNInput) for m in loaded.modules()) == 2
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), expected)


def test_fuse_is_idempotent_and_skips_dense_layers():
    need("cpu")
    model, dummy = build("bert")
    assert all(v.startswith("left as is") for v in fuse_ffn_(model).values())  # nn.Linear
    model, *_ = kernel_model("bert")
    assert all(v == "already fused" for v in fuse_ffn_(model).values())
    unfuse_ffn_(model)
    fc2 = model.bert.encoder.layer[0].output.dense
    fc2.backend = Backend.parse("reference")  # one FFN whose layers disagree stays unfused
    report = fuse_ffn_(model)
    assert report["bert.encoder.layer.0"].startswith("left as is: the layers' backends differ")
    assert type(fc2) is SparseLinear
    assert all(v.startswith("fused") for k, v in report.items() if k != "bert.encoder.layer.0")


def test_training_with_dropout_between_runs_the_models_dropout():
    """BART has dropout between the activation and fc2: in training the fused layers step
    aside (fc1 + activation, the model's dropout, then fc2), so outputs and gradients equal
    the unfused model's under the same random stream."""
    need("cpu")
    model, dummy, _, _ = kernel_model("bart")
    for layer in model.modules():
        if hasattr(layer, "activation_dropout"):
            layer.activation_dropout = 0.3
    plain = copy.deepcopy(model)
    unfuse_ffn_(plain)
    outs = []
    for m in (model, plain):
        m.train()
        torch.manual_seed(0)
        out = output_of(m, dummy)
        out.square().sum().backward()
        outs.append((out, next(p for n, p in m.named_parameters() if "fc1.values" in n).grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
