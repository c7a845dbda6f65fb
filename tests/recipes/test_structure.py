"""Where the recipe prunes: FFN first layers found by position in every family, also once
pruning has made an FFN narrower than the hidden size."""

import pytest
import torch

from sparsekernels.recipes.structure import ffn_input_layers
from sparsekernels.speedup import ModelSpeedup
from tests.speedup.families import FAMILIES, build

# transformers 5 renamed ViT's FFN (intermediate.dense -> mlp.fc1)
FIRST = {"bert": ("intermediate.dense",), "roberta": ("intermediate.dense",), "gpt2": ("mlp.c_fc",),
         "bart": ("fc1",), "t5": ("DenseReluDense.wi_",), "vit": ("mlp.fc1", "intermediate.dense")}
LAYERS = {"bert": 2, "roberta": 2, "gpt2": 2, "bart": 4, "t5": 8, "vit": 2}  # t5: wi_0 + wi_1


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_every_ffn_first_layer_and_nothing_else(family):
    model, dummy = build(family)
    found = ffn_input_layers(model, dummy)
    assert len(found) == LAYERS[family] and all(any(f in n for f in FIRST[family]) for n in found), found


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_an_ffn_narrower_than_the_hidden_size_is_still_found(family):
    model, dummy = build(family)  # hidden 64, FFN 128
    before = ffn_input_layers(model, dummy)
    masks = {}
    for name in before:  # keep 24 of 128 units: narrower than the 64 hidden channels
        w = torch.zeros_like(model.get_submodule(name).weight)
        w[torch.randperm(w.shape[0])[:24]] = 1
        masks[name] = {"weight": w}
    ModelSpeedup(model, dummy, masks, mode="resize").speedup_model()
    assert all(model.get_submodule(n).out_features == 24 for n in before)
    assert ffn_input_layers(model, dummy) == before
