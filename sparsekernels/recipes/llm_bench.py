"""Greedy generation timed for the LLM recipe: prefill and per-token decode of several models
on one prompt, the models taking turns (medians), and prompts answered side by side."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def greedy(model: nn.Module, ids: torch.Tensor, new: int, eos: int | None = None) -> torch.Tensor:
    """``new`` greedy tokens after ``ids`` (transformers' generate() with its KV cache); with
    ``eos`` generation may stop early, without it exactly ``new`` tokens come."""
    kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=0 if eos is None else eos)
    if eos is None:
        kwargs["min_new_tokens"] = new
    else:
        kwargs["eos_token_id"] = eos
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def time_generation(models: dict[str, nn.Module], ids: torch.Tensor, new: int,
                    reps: int) -> dict[str, dict]:
    """Per model: prefill_ms (generate() of one token: the prompt's forward), decode_ms per
    new token ((generate() of ``new`` - prefill) / (new - 1)) and tok_s; one warm-up each,
    then ``reps`` rounds in which every model runs in turn."""
    if new < 2:
        raise ValueError(f"decode time needs at least 2 new tokens, got {new}")
    prefill = {k: [] for k in models}
    full = {k: [] for k in models}
    for m in models.values():
        greedy(m, ids, 2)
    for _ in range(reps):
        for name, m in models.items():
            t0 = time.perf_counter()
            greedy(m, ids, 1)
            t1 = time.perf_counter()
            greedy(m, ids, new)
            t2 = time.perf_counter()
            prefill[name].append(t1 - t0)
            full[name].append(t2 - t1)
    out = {}
    for name in models:
        p, f = statistics.median(prefill[name]), statistics.median(full[name])
        decode = max(f - p, 1e-9) / (new - 1)
        out[name] = {"prefill_ms": p * 1e3, "decode_ms": decode * 1e3, "tok_s": 1.0 / decode,
                     "prefill_tok_s": ids.shape[1] / p}
    return out


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers the model holds (a tied tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def answer(model: nn.Module, tokenizer, prompt: str, new: int) -> str:
    """The model's greedy answer to ``prompt`` (in the tokenizer's chat template when it has
    one), up to ``new`` tokens or the end-of-text token."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = greedy(model, ids, new, eos=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
