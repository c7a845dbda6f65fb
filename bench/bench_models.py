"""End-to-end latency and peak memory of sped-up models: dense, masked, kernel, resize, auto.

    python bench/bench_models.py            # BERT-base, GPT-2 small, T5-small, ViT-B/16 shapes
    python bench/bench_models.py --smoke    # a tiny BERT, seconds (CI)
    python bench/bench_models.py --memory-only   # add the memory columns to saved rows
    python bench/bench_models.py --headline # BERT-base kernel mode at 70% (tools/gpu_check.py)

Peak memory (*_MB) = the model's parameters and buffers + the peak allocated above them
during one forward (GPU: the caching allocator's peak; CPU: the malloc heap sampled after
every aten op). The masked model's memory is the dense model's.

Random weights (speed does not depend on training). At each sparsity s:
- block masks: every encoder Linear keeps a random (1 - s) of its 32x32 blocks; run as
  masked dense, kernel mode (SparseLinear) and auto;
- structured masks: a fraction s of every FFN's units and of every layer's heads; run as
  masked dense, resize mode and auto.
Each table row is one model x sparsity x mask kind; ratios are vs the dense model, timed
interleaved in one run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import model_bytes, peak_activation_bytes, time_interleaved, write_results  # noqa: E402

from sparsekernels.arch import layers  # noqa: E402
from sparsekernels.arch import find_attention  # noqa: E402
from sparsekernels.speedup import ModelSpeedup  # noqa: E402
from sparsekernels.speedup.model_speedup import count_params  # noqa: E402


MODELS = "bert-base,gpt2,t5-small,vit-b16"
MASK_KINDS = ("block", "structured")


@dataclasses.dataclass(frozen=True)
class ModelCase:
    name: str
    batch: int
    seq: int


def build(name: str, smoke: bool):
    torch.manual_seed(0)
    if name == "bert-base":
        cfg = (tf.BertConfig(hidden_size=128, num_attention_heads=4, intermediate_size=512,
                             num_hidden_layers=2) if smoke else tf.BertConfig())
        return tf.BertModel(cfg, add_pooling_layer=False), "encoder"
    if name == "gpt2":
        return tf.GPT2Model(tf.GPT2Config()), "h."
    if name == "t5-small":
        cfg = tf.T5Config(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6,
                          num_decoder_layers=6, decoder_start_token_id=0)
        return tf.T5Model(cfg), "encoder."
    if name == "vit-b16":
        model = tf.ViTModel(tf.ViTConfig(), add_pooling_layer=False)
        # transformers 5 keeps ViT's blocks in `layers`, 4.x in `encoder.layer`
        scope = "layers." if any(n.startswith("layers.") for n, _ in model.named_modules()) else "encoder"
        return model, scope
    raise ValueError(name)


def dummy_for(name: str, model, batch: int, seq: int):
    if name == "vit-b16":
        return {"pixel_values": torch.randn(batch, 3, 224, 224)}
    ids = torch.randint(0, 1000, (batch, seq))
    if name == "t5-small":
        return {"input_ids": ids, "decoder_input_ids": ids[:, : seq // 4]}
    return {"input_ids": ids}


def block_masks(model, scope: str, sparsity: float, block=(32, 32)):
    masks = {}
    for name, module in model.named_modules():
        if scope not in name or layers.type_name(module) not in ("Linear", "Conv1D"):
            continue
        out_f, in_f = layers.canonical_shape(module)
        grid = (out_f // block[0], in_f // block[1])
        n = grid[0] * grid[1]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n)[: round((1 - sparsity) * n)]] = True
        mask = keep.view(grid).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1).float()
        masks[name] = {"weight": layers.from_canonical(module, mask)}
    return masks


# the first Linear of each family's FFN (its rows are the FFN units)
FFN_INPUTS = ("intermediate.dense", "mlp.c_fc", "DenseReluDense.wi", "DenseReluDense.wi_0",
              "mlp.fc1", ".fc1")


def structured_masks(model, scope: str, sparsity: float):
    """A fraction `sparsity` of every FFN's units (first FFN layer rows) and of every
    layer's heads (their value rows), in scope."""
    masks = {}
    for block in find_attention(model):
        if scope not in block.name:
            continue
        v = model.get_submodule(block.v)
        h, d = block.num_heads, block.head_dim
        off = 2 * h * d if block.fused else 0
        mask = torch.ones(layers.canonical_shape(v))
        for head in torch.randperm(h)[: round(sparsity * h)].tolist():
            mask[off + head * d: off + (head + 1) * d] = 0
        masks[block.v] = {"weight": layers.from_canonical(v, mask)}
    for name, module in model.named_modules():
        if scope in name and name.endswith(FFN_INPUTS):
            out_f = layers.canonical_shape(module)[0]
            mask = torch.ones(layers.canonical_shape(module))
            mask[torch.randperm(out_f)[: round(sparsity * out_f)]] = 0
            masks[name] = {"weight": layers.from_canonical(module, mask)}
    return masks


def apply(model, masks):
    with torch.no_grad():
        for name, entry in masks.items():
            for p, m in entry.items():
                param = getattr(model.get_submodule(name), p)
                param.mul_(m.to(param.device, param.dtype))  # masks are made on the CPU
    return model


def _saved_rows(device) -> list[dict]:
    """Rows of the existing models.csv."""
    from common import device_name, read_results, results_root

    return read_results(results_root() / device_name(device) / "models.csv")


def _key(row: dict) -> tuple:
    """A results row's identity: model, sparsity, mask kind."""
    return row["model"], float(row["sparsity"]), row["masks"]


def _with_memory(row: dict, memory: dict) -> dict:
    out = dict(row)
    for mode in ("dense", "kernel", "resize", "auto"):
        value = memory.get(mode)
        out[f"{mode}_MB"] = value if value is not None else float("nan")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default=MODELS)
    p.add_argument("--sparsities", default="0.5,0.7,0.9")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--masks", default=",".join(MASK_KINDS), help="mask kinds to run")
    p.add_argument("--headline", action="store_true",
                   help="the GPU check's point: --models bert-base --sparsities 0.7 --masks block")
    p.add_argument("--merge", action="store_true",
                   help="replace only these models' rows in the existing results file")
    p.add_argument("--memory-only", action="store_true",
                   help="measure peak memory and merge it into the saved rows (no timing: "
                        "memory does not need a quiet machine)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite models.md from models.csv (no measurement)")
    p.add_argument("--note", action="append", default=[],
                   help="a provenance line for the notes (e.g. which run made which rows)")
    args = p.parse_args(argv)
    if args.headline:
        args.models, args.sparsities, args.masks = "bert-base", "0.7", "block"
    kinds = args.masks.split(",")
    if not set(kinds) <= set(MASK_KINDS):
        p.error(f"--masks: each must be one of {', '.join(MASK_KINDS)}, got {args.masks!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    batch, seq = (32, 128) if device.type == "cuda" else (8, 128)
    models = ["bert-base"] if args.smoke else args.models.split(",")
    sparsities = [0.7] if args.smoke else [float(s) for s in args.sparsities.split(",")]
    if args.smoke:
        batch, seq = 2, 32
    rows, saved_rows = [], _saved_rows(device)
    if args.render_only:
        models, rows = [], saved_rows
    saved = {_key(r): r for r in saved_rows}
    for name in models:
        base, scope = build(name, args.smoke)
        base = base.eval().to(device=device, dtype=dtype)
        dummy = {k: v.to(device) for k, v in dummy_for(name, base, batch, seq).items()}
        if "pixel_values" in dummy:
            dummy["pixel_values"] = dummy["pixel_values"].to(dtype)
        for s in sparsities:
            for kind in kinds:
                masks = (block_masks if kind == "block" else structured_masks)(base, scope, s)
                masked = apply(copy.deepcopy(base), masks)
                variants = {"dense": base, "masked": masked}
                for mode in (("kernel", "kernel_unfused", "auto") if kind == "block"
                             else ("resize", "auto")):
                    m = copy.deepcopy(base)
                    ModelSpeedup(m, dummy, masks, mode=mode.replace("_unfused", ""),
                                 block_size=(32, 32), fuse_ffn=mode != "kernel_unfused",
                                 ).speedup_model()
                    variants[mode] = m
                with torch.no_grad():
                    ref = masked(**dummy)[0].float()
                    for mode, m in variants.items():
                        if mode in ("dense", "masked"):
                            continue
                        out = m(**dummy)[0].float()
                        err = ((out - ref).abs().max() / ref.abs().max()).item()
                        assert err < (1e-3 if dtype == torch.float32 else 5e-2), f"{name} {mode}: {err}"
                    memory = {}
                    for mode, m in variants.items():
                        if mode not in ("masked", "kernel_unfused"):
                            act = peak_activation_bytes(lambda m=m: m(**dummy), device)
                            memory[mode] = (model_bytes(m) + act) / 1e6 if act is not None else None
                    if args.memory_only:
                        row = saved.get((name, float(s), kind))
                        if row is None:
                            print(f"{name} s={s} {kind}: no saved row to add memory to; skipped")
                            continue
                        rows.append(_with_memory(row, memory))
                        print(f"{name} s={s} {kind}: " + ", ".join(
                            f"{k} {v:.0f} MB" for k, v in memory.items() if v is not None))
                        continue
                    t = time_interleaved({k: (lambda m=m: m(**dummy)) for k, m in variants.items()},
                                         device, reps=3 if args.smoke else args.reps)
                    # encoder-decoder (T5): the masks cover the encoder only, so its own time
                    # says what the kernels do there; the decoder stays dense in every variant
                    t_enc = {}
                    if name == "t5-small":
                        t_enc = time_interleaved(
                            {k: (lambda m=m: m.encoder(input_ids=dummy["input_ids"]))
                             for k, m in variants.items() if k != "masked"},
                            device, reps=3 if args.smoke else args.reps)
                row = {"model": name, "batch": batch, "seq": seq, "sparsity": s, "masks": kind,
                       "dtype": str(dtype).replace("torch.", ""), "dense_ms": t["dense"] * 1e3,
                       "masked_ms": t["masked"] * 1e3}
                for mode in ("kernel", "resize", "auto"):
                    if mode in t:
                        row[f"{mode}_ms"] = t[mode] * 1e3
                        row[f"{mode}_speedup"] = t["dense"] / t[mode]
                    else:
                        row[f"{mode}_ms"] = row[f"{mode}_speedup"] = float("nan")
                if "kernel_unfused" in t:  # ModelSpeedup(fuse_ffn=False): SparseLinear pairs
                    row["kernel_unfused_ms"] = t["kernel_unfused"] * 1e3
                    row["ffn_fusion_gain"] = t["kernel_unfused"] / t["kernel"]
                if t_enc:
                    row["encoder_dense_ms"] = t_enc["dense"] * 1e3
                    for mode in ("kernel", "resize", "auto"):
                        if mode in t_enc:
                            row[f"encoder_{mode}_speedup"] = t_enc["dense"] / t_enc[mode]
                best = min(t.get("kernel", float("inf")), t.get("resize", float("inf")))
                row["auto_vs_best"] = t["auto"] / best
                row["params_dense_M"] = count_params(base) / 1e6
                row["params_auto_M"] = count_params(variants["auto"]) / 1e6
                row = _with_memory(row, memory)
                rows.append(row)
                print(f"{name} s={s} {kind}: dense {row['dense_ms']:.1f} ms, "
                      + ", ".join(f"{m} x{row[f'{m}_speedup']:.2f}" for m in ("kernel", "resize", "auto")
                                  if row[f"{m}_ms"] == row[f"{m}_ms"])
                      + f", auto/best {row['auto_vs_best']:.3f}; peak MB dense "
                      f"{row['dense_MB']:.0f}, auto {row['auto_MB']:.0f}", flush=True)
    if args.smoke:
        return 0
    notes = [f"- batch {batch} x {seq} tokens, {str(dtype)}, random weights; block masks: 32x32 "
             "blocks kept at random in every encoder Linear; structured: FFN units and heads",
             "- *_speedup = dense / mode; auto_vs_best = auto / min(kernel, resize) (target <= 1.05)",
             "- kernel and auto fuse each FFN whose two layers are SparseLinear (bsr_ffn); "
             "kernel_unfused = kernel mode with ModelSpeedup(fuse_ffn=False); ffn_fusion_gain = "
             "kernel_unfused / kernel",
             "- t5-small: only the encoder's Linears are masked; the decoder (a quarter of the "
             "tokens, but self + cross attention) stays dense; encoder_* = the encoder alone "
             "(model.encoder), timed interleaved in the same run"]
    notes += [f"- {line}" for line in args.note]
    if args.memory_only:
        notes.append("- memory columns from `bench_models.py --memory-only` (same shapes and "
                     "mask kinds; its own random masks)")
    if args.merge or args.memory_only:
        done = {_key(r) for r in rows}
        rows = [r for r in saved_rows if _key(r) not in done] + rows
        # the models' canonical order (the --models default), so a merged model keeps its place
        order = list(dict.fromkeys(MODELS.split(",") + [r["model"] for r in rows]))
        rows.sort(key=lambda r: (order.index(r["model"]), float(r["sparsity"]), r["masks"]))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = write_results(device, "models", "End-to-end model latency and peak memory after "
                        "ModelSpeedup", rows, notes, md_columns=columns)
    print(f"wrote {out}/models.{{csv,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
