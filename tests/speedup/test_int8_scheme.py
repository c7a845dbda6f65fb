"""ModelSpeedup(dtype="int8", int8_scheme=...): the scheme reaches every quantized layer and
survives save / load; the int8 output error on the dummy input is measured with activations
quantized wherever the scheme may; a large one (activation outliers) moves "auto" to
weight-only int8, and under an explicit scheme warns with the way out."""

import warnings

import pytest
import torch

from sparsekernels.nn import QuantizedSparseLinear
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from tests.speedup.families import block_masks, build, output_of


def with_outlier_channel(model, factor=1000.0):
    """One outlier channel in the inputs of the projections, as trained decoder LLMs have:
    the norms' weight for channel 5 times `factor`."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[5] *= factor
    return model


def sped_up(model, dummy, **kwargs):
    masks = block_masks(model, (16, 16), 0.5)
    s = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16), dtype="int8",
                     **kwargs)
    s.speedup_model()
    return s.report


def outlier_llama():
    # one fixed tiny model: how far a random one carries an outlier channel to its output
    # varies from draw to draw (this one: w8a8 error 0.65, w8 0.01)
    torch.manual_seed(0)
    model, dummy = build("llama")
    return with_outlier_channel(model), dummy


def schemes_of(model) -> set:
    return {m.scheme for m in model.modules() if isinstance(m, QuantizedSparseLinear)}


def assert_reloads_as_w8(model, dummy, tmp_path):
    """Saved and loaded, every int8 layer is w8 and the output is the same, bit for bit."""
    with torch.no_grad():
        expected = output_of(model, dummy)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert schemes_of(loaded) == {"w8"}
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), expected)


def test_outliers_warn_under_explicit_w8a8_and_w8_keeps_them():
    model, dummy = outlier_llama()
    reference = build("llama")[0]
    reference.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="int8_scheme='w8'"):
        report = sped_up(model, dummy, int8_scheme="w8a8")
    assert report.int8_output_error > 0.1
    assert any("int8_scheme='w8'" in n for n in report.notes)
    assert schemes_of(model) == {"w8a8"}  # an explicit scheme is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_w8 = sped_up(reference, dummy, int8_scheme="w8")
    assert report_w8.int8_output_error < report.int8_output_error / 3
    assert schemes_of(reference) == {"w8"}


def test_auto_moves_to_w8_on_outliers_and_load_keeps_it(tmp_path):
    model, dummy = outlier_llama()
    explicit = build("llama")[0]
    explicit.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto's own choice: a note, not a warning
        torch.manual_seed(1)  # the same random block masks for both
        report = sped_up(model, dummy)
        torch.manual_seed(1)
        report_w8 = sped_up(explicit, dummy, int8_scheme="w8")
    assert schemes_of(model) == {"w8"}
    assert any("int8_scheme='auto'" in n and "w8a8" in n for n in report.notes)
    assert report.int8_output_error == pytest.approx(report_w8.int8_output_error, rel=1e-6)
    assert report.int8_output_error < 0.1
    with torch.no_grad():
        assert torch.equal(output_of(model, dummy), output_of(explicit, dummy))
    assert_reloads_as_w8(model, dummy, tmp_path)


def test_scheme_saved_and_loaded(tmp_path):
    model, dummy = build("llama")
    sped_up(model, dummy, int8_scheme="w8")
    assert_reloads_as_w8(model, dummy, tmp_path)


def test_error_measured_only_in_int8():
    model, dummy = build("bert")
    masks = block_masks(model, (16, 16), 0.5)
    s = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16))
    s.speedup_model()
    assert s.report.int8_output_error is None
    model, dummy = build("bert")
    report = sped_up(model, dummy)
    assert report.int8_output_error is not None and report.int8_output_error < 0.1


def test_bad_scheme_refused_before_any_change():
    model, dummy = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="w8a8"):
        ModelSpeedup(model, dummy, {}, mode="kernel", dtype="int8", int8_scheme="w4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_scheme_in_a_record_refused():
    from sparsekernels.speedup.surgery import validate_structure

    model, _ = build("llama")
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match="scheme"):
        validate_structure(model, {name: [{"op": "quantize_int8", "scheme": "w4"}]})
