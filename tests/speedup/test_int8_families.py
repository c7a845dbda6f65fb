"""ModelSpeedup(dtype="int8") on every family: runs (T5's FFN reads its output layer's
weight dtype), stays close to the float model and reloads to the same output."""

import pytest
import torch

from sparsekernels.nn import QuantizedSparseLinear
from sparsekernels.speedup import ModelSpeedup, load_model, save_model
from tests.speedup.families import (FAMILIES, LLM_FAMILIES, apply_masks, block_masks, build,
                                   output_of)


@pytest.mark.parametrize("family", FAMILIES + LLM_FAMILIES)
def test_int8_kernel_mode_runs_and_reloads(family, tmp_path):
    model, dummy = build(family)
    masks = block_masks(model, (16, 16), 0.5)
    apply_masks(model, masks)  # the masked float model is the int8 model's reference
    with torch.no_grad():
        reference = output_of(model, dummy).double()
    s = ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16), dtype="int8",
                     int8_scheme="w8")
    s.speedup_model()
    assert any(isinstance(m, QuantizedSparseLinear) for m in model.modules())
    with torch.no_grad():
        out = output_of(model, dummy)
    err = ((out.double() - reference).norm() / reference.norm()).item()
    assert err < 0.05, err
    save_model(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(output_of(load_model(tmp_path / "m"), dummy), out)


def test_weight_view_is_the_int8_blocks():
    layer = torch.nn.Linear(32, 16)
    q = QuantizedSparseLinear.from_linear(layer, (16, 16))
    w = q.weight
    assert w.dtype == torch.int8 and tuple(w.shape) == (16, 32)
    assert torch.equal(w.to_dense(), q.to_linear().weight.div(q.scale[:, None]).round()
                       .to(torch.int8))
