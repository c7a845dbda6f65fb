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


def example_input(model: torch.nn.Module, batch: int = 1, length: int = 8) -> Any:
    """A small valid input made from a transformers model's config (token ids, pixels, and
    decoder ids for encoder-decoders), or None when the config does not say enough."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    device = next(iter(model.parameters()), torch.empty(0)).device
    image_size = getattr(config, "image_size", None)
    if isinstance(image_size, int) and "pixel_values" in _forward_args(model):
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, image_size, image_size,
                                            device=device)}
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        return None
    ids = torch.arange(length, device=device).remainder(vocab - 1).add(1).expand(batch, length)
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : max(1, length // 2)]
    return inputs


def _forward_args(model: torch.nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
