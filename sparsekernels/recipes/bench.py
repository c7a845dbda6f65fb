"""The recipe's benchmark: latency of the dense teacher, the pruned (resized) student, and
kernel / auto variants of the teacher at the same kind of sparsity (random blocks of
speedup.block_size in every encoder Linear), timed interleaved on the same inputs;
per-layer time too."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from sparsekernels.arch import layers


def _inputs(model: nn.Module, batch: int, seq: int) -> dict:
    device = next(model.parameters()).device
    config = model.config
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        size = config.image_size  # an image model: seq does not apply, the patches are fixed
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, device=device)}
    vocab = getattr(config, "vocab_size", 1000)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), device=device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}


def _sync(inputs: dict) -> None:
    if any(v.is_cuda for v in inputs.values()):  # time the kernels, not their launch
        torch.cuda.synchronize()


def time_models(models: dict[str, nn.Module], inputs: dict, reps: int) -> dict[str, float]:
    """Median ms per forward, the models run in turn within each repetition."""
    samples = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(**inputs)
        for _ in range(reps):
            for name, m in models.items():
                _sync(inputs)
                t0 = time.perf_counter()
                m(**inputs)
                _sync(inputs)
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def block_masks(model: nn.Module, sparsity: float, block=(32, 32), scope: str = "encoder") -> dict:
    masks = {}
    for name, module in model.named_modules():
        if scope not in name or layers.type_name(module) not in ("Linear", "Conv1D"):
            continue
        out_f, in_f = layers.canonical_shape(module)[:2]
        if out_f % block[0] or in_f % block[1]:
            continue
        grid = (out_f // block[0], in_f // block[1])
        keep = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
        keep[torch.randperm(keep.numel())[: round((1 - sparsity) * keep.numel())]] = True
        mask = keep.view(grid).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1).float()
        masks[name] = {"weight": layers.from_canonical(module, mask).to(module.weight.device)}
    return masks


def benchmark(teacher: nn.Module, student: nn.Module, record: dict, cfg, log=print,
              block: tuple[int, int] = (32, 32)) -> dict:
    from sparsekernels.recipes.profiling import per_layer_time
    from sparsekernels.speedup import ModelSpeedup

    inputs = _inputs(teacher, cfg.batch_size, cfg.seq_len)
    final_sparsity = record["points"][-1]["sparsity"] if record.get("points") else 0.0
    models = {"dense": teacher, "resize": student}
    dummy = {k: v[:2, :16] for k, v in inputs.items()}
    for s in cfg.kernel_sparsities:
        masks = block_masks(teacher, s, tuple(block))
        for mode in ("kernel", "auto"):
            m = copy.deepcopy(teacher)
            ModelSpeedup(m, dummy, masks, mode=mode, block_size=tuple(block)).speedup_model()
            models[f"{mode}@{s}"] = m.eval()
    times = time_models(models, inputs, cfg.reps)
    latency = [{"variant": "dense", "sparsity": 0.0, "ms": times["dense"]},
               {"variant": "resize", "sparsity": final_sparsity, "ms": times["resize"]}]
    for s in cfg.kernel_sparsities:
        for mode in ("kernel", "auto"):
            latency.append({"variant": mode, "sparsity": s, "ms": times[f"{mode}@{s}"]})
    shape = (f"{cfg.batch_size} images" if "pixel_values" in inputs
             else f"{cfg.batch_size}x{cfg.seq_len} tokens")
    log(f"  latency ({shape}): dense {times['dense']:.1f} ms, "
        f"pruned {times['resize']:.1f} ms (x{times['dense'] / times['resize']:.2f}); "
        + ", ".join(f"kernel@{s} x{times['dense'] / times[f'kernel@{s}']:.2f}"
                    for s in cfg.kernel_sparsities))
    per_layer = {"before": per_layer_time(teacher, inputs, reps=max(1, cfg.reps // 2)),
                 "after": per_layer_time(student, inputs, reps=max(1, cfg.reps // 2))}
    return {"latency": record.get("latency", []) + latency, "per_layer": per_layer,
            "speedup": times["dense"] / times["resize"],
            "bench_inputs": {"batch_size": cfg.batch_size,
                             "seq_len": None if "pixel_values" in inputs else cfg.seq_len,
                             "threads": torch.get_num_threads()}}
