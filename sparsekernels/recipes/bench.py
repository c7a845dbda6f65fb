"""The recipe's benchmark: latency of the dense teacher, the pruned (resized) student, and
kernel / auto variants of the teacher at the same kind of sparsity (random blocks of
speedup.block_size in every encoder Linear), in the run's speedup.dtype (and the student in
float32 beside it when that is another dtype), timed interleaved on the same inputs;
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


def variant_name(mode: str, dtype: str = "float32") -> str:
    """A latency row's variant: the mode, with the dtype when it is not float32."""
    return mode if dtype == "float32" else f"{mode} {dtype}"


def benchmark(teacher: nn.Module, student: nn.Module, record: dict, cfg, log=print,
              block: tuple[int, int] = (32, 32), dtype: str = "float32",
              float32_student: nn.Module | None = None) -> dict:
    """`student` is the final model (resized, in `dtype`); the kernel / auto variants of the
    teacher run in `dtype` too; `float32_student`, when given, is timed as the float32 resize."""
    from sparsekernels.recipes.profiling import per_layer_time
    from sparsekernels.speedup import ModelSpeedup

    inputs = _inputs(teacher, cfg.batch_size, cfg.seq_len)
    final_sparsity = record["points"][-1]["sparsity"] if record.get("points") else 0.0
    final = variant_name("resize", dtype)
    models = {"dense": teacher, final: student}
    if float32_student is not None:
        models["resize"] = float32_student
    dummy = {k: v[:2, :16] for k, v in inputs.items()}
    for s in cfg.kernel_sparsities:
        masks = block_masks(teacher, s, tuple(block))
        for mode in ("kernel", "auto"):
            m = copy.deepcopy(teacher)
            ModelSpeedup(m, dummy, masks, mode=mode, block_size=tuple(block),
                         dtype=dtype).speedup_model()
            models[f"{variant_name(mode, dtype)}@{s}"] = m.eval()
    times = time_models(models, inputs, cfg.reps)
    latency = [{"variant": "dense", "sparsity": 0.0, "ms": times["dense"]}]
    latency += [{"variant": v, "sparsity": final_sparsity, "ms": times[v]}
                for v in models if v.startswith("resize")]
    for s in cfg.kernel_sparsities:
        for mode in ("kernel", "auto"):
            v = variant_name(mode, dtype)
            latency.append({"variant": v, "sparsity": s, "ms": times[f"{v}@{s}"]})
    shape = (f"{cfg.batch_size} images" if "pixel_values" in inputs
             else f"{cfg.batch_size}x{cfg.seq_len} tokens")
    kernel = variant_name("kernel", dtype)
    log(f"  latency ({shape}): dense {times['dense']:.1f} ms, "
        f"pruned {times[final]:.1f} ms (x{times['dense'] / times[final]:.2f}"
        + (f"; float32 x{times['dense'] / times['resize']:.2f}" if final != "resize" else "")
        + "); " + ", ".join(f"{kernel}@{s} x{times['dense'] / times[f'{kernel}@{s}']:.2f}"
                            for s in cfg.kernel_sparsities))
    per_layer = {"before": per_layer_time(teacher, inputs, reps=max(1, cfg.reps // 2)),
                 "after": per_layer_time(student, inputs, reps=max(1, cfg.reps // 2))}
    return {"latency": record.get("latency", []) + latency, "per_layer": per_layer,
            "speedup": times["dense"] / times[final],
            "bench_inputs": {"batch_size": cfg.batch_size,
                             "seq_len": None if "pixel_values" in inputs else cfg.seq_len,
                             "threads": torch.get_num_threads()}}
