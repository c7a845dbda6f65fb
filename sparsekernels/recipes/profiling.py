"""What a pruned model is made of and where its time goes.

params_by_component(model)   parameters in the embedding, attention, FFN and the rest
encoder_sparsity(model, d)   1 - (attention + FFN parameters now) / (the same in the dense model)
per_layer_time(model, x)     ms per encoder layer, embeddings and head, from torch.profiler

Components are read from each parameter's path through the tables in
sparsekernels.arch.names (which names mean embedding, attention, FFN and the head), so they
hold for BERT, RoBERTa, MiniLM, ViT, GPT-2, BART, T5 and the decoder LLMs, before and after
resizing. A SparseLinear counts what it stores (its `values` blocks and bias), not its dense shape;
`count_nonzero=True` counts non-zero entries instead, for masked (not yet sped-up) models.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import torch
from torch import nn

from sparsekernels.arch import find_layers, names

COMPONENTS = ("embedding", "attention", "ffn", "other")
_RANGE_PREFIX = "sparsekernels.layer::"


def component_of(path: str, embedding_modules: set[str] = frozenset()) -> str:
    """The component of a parameter path, e.g. 'bert.encoder.layer.0.attention.self.query.weight'
    -> 'attention'. embedding_modules: paths of nn.Embedding modules, embedding wherever."""
    parts = path.split(".")
    lower = [p.lower() for p in parts]
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    if prefixes & embedding_modules or any(
            p in names.EMBEDDING_PARTS or p.startswith("embed_") for p in lower):
        return "embedding"
    if any(p in names.ATTENTION_PARTS for p in lower):
        return "attention"
    if any(p in names.FFN_PARTS for p in lower):
        return "ffn"
    if any(p == names.FFN_OUTPUT_PART and i > 0 and parts[i - 1].isdigit()
           for i, p in enumerate(lower)):
        return "ffn"  # BERT / ViT: layer.N.output.{dense,LayerNorm}
    leaves = lower[:-1] if lower[-1] in ("weight", "bias", "values") else lower
    in_layer = any(p.isdigit() for p in parts)  # a head's out_proj is not attention
    if in_layer and leaves and leaves[-1] in names.ATTENTION_LEAVES:
        return "attention"
    if in_layer and leaves and leaves[-1] in names.FFN_LEAVES:
        return "ffn"
    return "other"


def params_by_component(model: nn.Module, *, count_nonzero: bool = False) -> dict[str, int]:
    """Parameters per component ({'embedding', 'attention', 'ffn', 'other'}); shared
    (tied) parameters are counted once. See the module docstring for the rules."""
    from sparsekernels.nn.quantized_sparse_linear import QuantizedSparseLinear

    embedding_modules = {name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    # an int8 layer's weights and bias are buffers (no gradient): stored blocks and a bias
    # like SparseLinear's parameters (its per-channel scales are not counted)
    int8_weights = [(f"{name}.{attr}", getattr(m, attr)) for name, m in model.named_modules()
                    if isinstance(m, QuantizedSparseLinear) for attr in ("values", "bias")
                    if isinstance(getattr(m, attr, None), torch.Tensor)
                    and not isinstance(getattr(m, attr), nn.Parameter)]
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in list(model.named_parameters()) + int8_weights:  # tied ones once
        n = int(torch.count_nonzero(p.detach())) if count_nonzero else p.numel()
        counts[component_of(name, embedding_modules)] += n
    return counts


def encoder_sparsity(model: nn.Module, dense_params_by_component: dict[str, int], *,
                     count_nonzero: bool = False) -> float:
    """1 - (attention + FFN parameters now) / (attention + FFN parameters of the dense model):
    the "encoder sparsity" NNI's pruning guide reports (embeddings and head left out)."""
    missing = {"attention", "ffn"} - set(dense_params_by_component)
    if missing:
        raise ValueError(f"dense_params_by_component lacks {sorted(missing)}; pass "
                         f"params_by_component(dense_model)")
    dense = dense_params_by_component["attention"] + dense_params_by_component["ffn"]
    if dense <= 0:
        raise ValueError("the dense model has no attention or FFN parameters; is "
                         "dense_params_by_component from the right model?")
    now = params_by_component(model, count_nonzero=count_nonzero)
    return 1.0 - (now["attention"] + now["ffn"]) / dense


# -- per-layer time -------------------------------------------------------------------------
def timed_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Report key -> the modules whose forward time it sums: 'embeddings', 'layer.i', 'head'."""
    groups: dict[str, list[nn.Module]] = {}
    lists = [(name, model.get_submodule(name)) for name, _ in find_layers(model)]
    inside = {id(m) for _, lst in lists for m in lst.modules()}
    embeddings = [m for name, m in model.named_modules()
                  if name.split(".")[-1] == "embeddings" and id(m) not in inside]
    if not embeddings:
        embeddings = [m for m in model.modules()
                      if isinstance(m, nn.Embedding) and id(m) not in inside]
    if embeddings:
        groups["embeddings"] = embeddings[:1] if embeddings[0].__class__ is not nn.Embedding \
            else embeddings
    for list_name, lst in lists:
        for i, layer in enumerate(lst):
            key = f"layer.{i}" if len(lists) == 1 else f"{list_name}.{i}"
            groups[key] = [layer]
    taken = {id(x) for ms in groups.values() for m in ms for x in m.modules()}
    head = []
    for name, m in model.named_modules():
        if name.split(".")[-1] in names.HEAD_MODULES and id(m) not in inside and id(m) not in taken:
            head.append(m)
            taken |= {id(x) for x in m.modules()}
    if head:
        groups["head"] = head
    return groups


def _rows(events, names: dict[str, str], on_device: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in events:
        key = names.get(e.name)
        if key is None:
            continue
        us = getattr(e, "device_time_total", 0.0) if on_device else e.cpu_time_total
        out[key] = out.get(key, 0.0) + us / 1000.0
    return out


def per_layer_time(model: nn.Module, inputs: dict, reps: int = 3) -> dict[str, float]:
    """Milliseconds per encoder layer ('layer.0' ...), 'embeddings' and 'head', each the
    median over `reps` profiled forwards (after one warm-up) of a torch.profiler
    record_function range opened and closed by forward hooks on that module. On CUDA the
    time is the device time of the kernels each range launched; on CPU its wall time.
    The model runs in eval mode under no_grad; its mode is restored and the hooks removed."""
    # kineto prints a line to stderr at every profiler start and stop unless told not to
    # (read when the profiler first starts; a user's own setting wins)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile, record_function

    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive integer, got {reps!r}")
    if not isinstance(inputs, dict):
        raise TypeError("inputs must be a dict of model keyword arguments (input_ids, ...)")
    groups = timed_modules(model)
    if not groups:
        raise ValueError(f"found no layers to time in {type(model).__name__}: no ModuleList "
                         f"of repeated blocks, no embeddings, no head")
    on_device = any(isinstance(v, torch.Tensor) and v.is_cuda for v in inputs.values())
    names, handles, open_ranges = {}, [], {}

    def pre(key):
        def hook(module, args):
            rf = record_function(_RANGE_PREFIX + key)
            rf.__enter__()
            open_ranges.setdefault(id(module), []).append(rf)
        return hook

    def post(module, args, output):
        stack = open_ranges.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    for key, modules in groups.items():
        names[_RANGE_PREFIX + key] = key
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre(key)))
            handles.append(m.register_forward_hook(post))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    was_training = model.training
    samples: dict[str, list[float]] = {k: [] for k in groups}
    try:
        model.eval()
        with torch.no_grad():
            model(**inputs)  # warm-up
            for _ in range(reps):
                with profile(activities=activities) as prof:
                    model(**inputs)
                    if on_device:
                        torch.cuda.synchronize()
                for key, ms in _rows(prof.events(), names, on_device).items():
                    samples[key].append(ms)
    finally:
        for stack in open_ranges.values():  # a forward that raised leaves ranges open
            while stack:
                stack.pop().__exit__(None, None, None)
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: statistics.median(v) for k, v in samples.items() if v}


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Total parameters and parameters by component, for the run record."""
    by = params_by_component(model)
    return {"total": sum(by.values()), **by}
