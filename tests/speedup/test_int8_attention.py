"""ModelSpeedup(attention_fp32_precision="bf16" / "int8"): attention that runs sparsekernels' op
computes its products of fp32 inputs in bf16 (or q k^T in int8); the record keeps it through save
/ load, and a record naming it is checked like every other change. Not implied by int8."""

import pytest
import torch

from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from tests.speedup.families import block_masks, build, output_of

_ATTR = "_sparsekernels_attention"


def sped_up(dtype, family="bert", **kwargs):
    torch.manual_seed(0)
    model, dummy = build(family)
    masks = block_masks(model, (16, 16), 0.5)
    s = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16), dtype=dtype,
                     **kwargs)
    s.speedup_model()
    return model, dummy, s


def precisions(model) -> list:
    return [getattr(m, _ATTR).fp32_precision for m in model.modules()
            if getattr(m, _ATTR, None) is not None]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_int8_attention_in_low_precision_and_reloaded(family, precision, tmp_path):
    model, dummy, s = sped_up("int8", family, attention_fp32_precision=precision)
    found = precisions(model)
    assert found and set(found) == {precision}
    assert sum(c["op"] == "attention_precision" for cs in s.structure.values() for c in cs) \
        == len(found)
    with torch.no_grad():
        expected = output_of(model, dummy)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert precisions(loaded) == found
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), expected)


def test_attention_bf16_products_must_be_asked_for():
    with pytest.raises(ValueError, match="attention_fp32_precision"):
        sped_up("int8", attention_fp32_precision="tf32")


def test_float_and_int8_modes_keep_fp32_attention_by_default():
    for dtype in (torch.float32, torch.bfloat16, "int8"):
        model, _, s = sped_up(dtype)
        assert set(precisions(model)) <= {"ieee"}
        assert not any(c["op"] == "attention_precision" for cs in s.structure.values()
                       for c in cs)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_attention_error_is_small(precision):
    """The int8 model with its attention products in bf16 (int8 q k^T) against the same model
    with fp32 attention: different where the CPU has AVX512-BF16 (and VNNI), by about their
    rounding; "int8" differs from "bf16" where it runs."""
    from sparsekernels.attention import set_fp32_precision_

    model, dummy, _ = sped_up("int8", attention_fp32_precision=precision)
    with torch.no_grad():
        fast = output_of(model, dummy)
        set_fp32_precision_(model, "ieee")
        exact = output_of(model, dummy)
        set_fp32_precision_(model, "bf16")
        bf16 = output_of(model, dummy)
    err = ((fast - exact).norm() / exact.norm()).item()
    if torch.ops.sparsekernels_C.cpu_has_avx512_bf16():
        assert 0 < err < (2e-2 if precision == "bf16" else 4e-2)
    else:
        assert err == 0
    if precision == "int8":
        assert torch.equal(fast, bf16) != torch.ops.sparsekernels_C.cpu_has_avx512_vnni_bf16()


def test_bad_records_and_values_refused():
    from sparsekernels.attention import set_fp32_precision_
    from sparsekernels.speedup.surgery import validate_structure

    model, _ = build("bert")
    name = next(n for n, m in model.named_modules() if type(m).__name__.endswith("SelfAttention"))
    with pytest.raises(ValueError, match="without an attention_layout"):
        validate_structure(model, {name: [{"op": "attention_precision",
                                           "fp32_precision": "bf16"}]})
    with pytest.raises(ValueError, match="fp32_precision"):
        validate_structure(model, {name: [{"op": "attention_kernel", "block_size": [64, 64]},
                                          {"op": "attention_precision",
                                           "fp32_precision": "tf32"}]})
    with pytest.raises(ValueError, match="not an attention module"):
        validate_structure(model, {name: [{"op": "attention_kernel", "block_size": [64, 64]}],
                                   name + ".query": [{"op": "attention_precision",
                                                      "fp32_precision": "bf16"}]})
    validate_structure(model, {name: [{"op": "attention_kernel", "block_size": [64, 64]},
                                      {"op": "attention_precision", "fp32_precision": "bf16"}]})
    with pytest.raises(ValueError, match="enable_"):
        set_fp32_precision_(model, "bf16", names=[name])
    with pytest.raises(ValueError, match="fp32_precision"):
        set_fp32_precision_(model, "half")
