"""Run a model on a `dummy_input`: a tensor, a tuple/list of positional inputs, or a dict of
keyword inputs (the forms NNI and transformers users pass).

A dummy input that does not fit the model fails deep inside torch (a matmul shape, an
embedding's index dtype); the first run of a model on a dummy input turns such a failure
into a DummyInputError that says so, names what the model takes and what it was given."""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Mapping

import torch

# models that ran once on a dummy input (by id): a later failure is not the input's fault
_FITTED: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


class DummyInputError(ValueError):
    """`dummy_input` does not fit the model it is run on."""


def run_model(model: torch.nn.Module, dummy_input: Any):
    try:
        if isinstance(dummy_input, Mapping):  # dicts and transformers' BatchEncoding
            out = model(**dummy_input)
        elif isinstance(dummy_input, (tuple, list)):
            out = model(*dummy_input)
        else:
            out = model(dummy_input)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as e:
        if _FITTED.get(model) == id(dummy_input) or type(e).__module__.startswith("sparsekernels"):
            raise  # not the input's fault, or already a refusal of ours that says what is wrong
        raise DummyInputError(f"dummy_input does not fit {type(model).__name__}: "
                              f"{type(e).__name__}: {_first_line(e)}. {expected_input(model)}; "
                              f"dummy_input is {describe_input(dummy_input)}") from e
    _FITTED[model] = id(dummy_input)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def describe_input(value: Any, depth: int = 0) -> str:
    """A short description of a dummy input: tensors by shape and dtype."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if depth > 1:
        return type(value).__name__
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_input(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe_input(v, depth + 1) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return type(value).__name__


def expected_input(model: torch.nn.Module) -> str:
    """What the model's forward takes: its parameters, and what its first layer reads."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    text = f"{type(model).__name__}.forward takes ({', '.join(params[:6])}{', ...' if len(params) > 6 else ''})"
    main = getattr(model, "main_input_name", None)
    if isinstance(main, str):
        kind = "integer token ids [batch, seq]" if main == "input_ids" else "a tensor"
        return text + f", mainly {main!r} ({kind})"
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        dtype = str(weight.dtype).replace("torch.", "")
        if isinstance(module, torch.nn.Embedding):
            return text + f"; its first layer {name!r} (Embedding) reads integer ids below " \
                          f"{module.num_embeddings}"
        if isinstance(module, torch.nn.Linear):
            return text + f"; its first layer {name!r} (Linear) reads [..., {module.in_features}] " \
                          f"{dtype}"
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return text + f"; its first layer {name!r} ({type(module).__name__}) reads " \
                          f"[batch, {module.in_channels}, ...] {dtype}"
        break
    return text


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
