"""DecodeLinear: the dense Linears a speedup leaves (an LM head, unpruned layers) run their
few-row eager calls on the decode GEMV, against float64; everything else is torch's."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekernels.nn.decode_linear as decode_linear
from sparsekernels.nn import DecodeLinear, decode_linears_, undo_decode_linears_
from sparsekernels.ops import _ext
from sparsekernels.ops.precision import cpu_isa
from sparsekernels.ops.router import DENSE_DECODE_ROWS
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from tests.speedup.families import apply_masks, block_masks, build


def need():
    if _ext.direct("dense_linear_inference") is None:
        pytest.skip("compiled CPU extension not built (make build)")


@pytest.fixture
def calls(monkeypatch):
    """How many calls reached the extension's entry."""
    need()
    seen = []
    entry = decode_linear.direct_dense_linear()
    monkeypatch.setattr(decode_linear, "direct_dense_linear",
                        lambda: lambda *a: seen.append(1) or entry(*a))
    return seen


def reference(x, layer):
    b = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), b)


def rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (2, 8, 96), (17, 96)],
                         ids=["T1", "T5", "2x8", "T17"])
def test_fp32_matches_float64_and_takes_few_rows_only(calls, shape, bias):
    layer = nn.Linear(96, 160, bias=bias)
    assert decode_linears_(layer) == [""] and type(layer) is DecodeLinear
    x = torch.randn(*shape)
    with torch.no_grad():
        y = layer(x)
    rows = x.numel() // 96
    assert len(calls) == (1 if rows <= DENSE_DECODE_ROWS[torch.float32] else 0)
    assert y.shape == (*shape[:-1], 160)
    assert rel_err(y, reference(x, layer)) < 1e-5


def test_bf16_matches_float64_up_to_its_row_limit(calls):
    if "avx512_bf16" not in cpu_isa():
        pytest.skip("this CPU has no AVX-512 BF16 (bf16 stays on torch's Linear)")
    model = nn.Sequential(nn.Linear(64, 128))
    assert decode_linears_(model) == ["0"]
    model.to(torch.bfloat16)  # the cast asks the router again: bf16's own row limit
    limit = DENSE_DECODE_ROWS[torch.bfloat16]
    assert model[0]._decode_rows == limit
    for rows in (1, limit, limit + 1):
        calls.clear()
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            y = model(x)
        assert y.dtype == torch.bfloat16 and len(calls) == (rows <= limit)
        assert rel_err(y, reference(x, model[0])) < 2e-2


def test_shapes_the_entry_does_not_take_run_torch(calls):
    layer = nn.Linear(96, 100)  # 100 outputs: not whole 16-row blocks
    decode_linears_(layer)
    x = torch.randn(2, 96)
    with torch.no_grad():
        y = layer(x)
    assert len(calls) == 1  # asked, refused: torch's Linear ran
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))


def test_gradients_and_modes_take_torch(calls):
    layer = nn.Linear(96, 64)
    plain = copy.deepcopy(layer)
    decode_linears_(layer)
    x = torch.randn(3, 96)
    layer(x).sum().backward()  # a gradient to record: torch's Linear
    plain(x).sum().backward()
    assert calls == []
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    layer.weight.requires_grad_(False)
    layer.bias.grad = None
    layer(x).sum().backward()  # a trainable bias alone still needs torch's graph
    assert calls == [] and layer.bias.grad is not None


def test_tied_weights_stay_tied_and_undo():
    need()
    emb = nn.Embedding(128, 64)
    head = nn.Linear(64, 128, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert decode_linears_(model) == ["head"]
    assert model["head"].weight is emb.weight
    with torch.no_grad():
        emb.weight.mul_(2)  # the head reads the embedding's storage
        x = torch.randn(1, 64)
        assert rel_err(model["head"](x), reference(x, model["head"])) < 1e-5
    assert undo_decode_linears_(model) == 1 and type(model["head"]) is nn.Linear


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: a tied LM head
def test_model_speedup_runs_the_dense_linears_on_it_and_saves(family, tmp_path, calls):
    model, dummy = build(family)
    masks = {k: v for k, v in block_masks(model, (16, 16), 0.5).items() if k != "lm_head"}
    masked = apply_masks(copy.deepcopy(model), masks)
    speedup = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16))
    speedup.speedup_model()
    assert "lm_head" in speedup.report.decode_linears
    assert type(model.lm_head) is DecodeLinear
    ids = dummy["input_ids"][:1, :1]  # one token: a decode-sized call to the head
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = masked(input_ids=ids).logits
    assert calls and rel_err(got, want.double()) < 1e-4
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded.lm_head) is DecodeLinear
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, got, rtol=0, atol=1e-5)
    off = ModelSpeedup(build(family)[0], dummy, masks, mode="kernel", block_size=(16, 16),
                       dense_decode=False).speedup_model()
    assert not any(type(m) is DecodeLinear for m in off.modules())


def test_a_record_on_a_module_that_is_not_a_linear_is_refused():
    from sparsekernels.speedup.surgery import validate_structure

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    validate_structure(model, {"0": [{"op": "decode_linear"}]})
    with pytest.raises(ValueError, match="only an nn.Linear"):
        validate_structure(model, {"1": [{"op": "decode_linear"}]})
