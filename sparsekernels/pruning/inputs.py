"""Run a model on a `dummy_input`: a tensor, a tuple/list of positional inputs, or a dict of
keyword inputs (the forms NNI and transformers users pass)."""

from __future__ import annotations

from typing import Any, Mapping

import torch


def run_model(model: torch.nn.Module, dummy_input: Any):
    if isinstance(dummy_input, Mapping):  # dicts and transformers' BatchEncoding
        return model(**dummy_input)
    if isinstance(dummy_input, (tuple, list)):
        return model(*dummy_input)
    return model(dummy_input)
