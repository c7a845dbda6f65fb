"""The LLM recipe's report: report.md (and record.json) in the run directory.

    path = write_llm_report(run_dir, record)

record (written by recipes/llm.py; every section but config and versions optional):
  dense       {"perplexity", "params"}
  points      [{"stage": dense|one-shot|recovered, "step", "sparsity", "perplexity"}]
  generation  {"dense_decode_ms", "pruned_decode_ms", "decode_x", "prefill_x", ...}
  answers     [{"prompt", "dense", "pruned"}]
  final       {"perplexity", "masked_perplexity", "dense_perplexity", "sparsity", ...}
  sweep       [{"pruner", "granularity", "sparsity", "measured_sparsity", "perplexity", ...}]
  sweep_speed [{"sparsity", "pruner", "dense_tok_s", "pruned_tok_s", "decode_x", ...}]
Both files are written to a temporary name and moved into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sparsekernels.recipes.report import (RECORD_FILE, REPORT_FILE, _num, _pct, _plain, _table,
                                          _write_text)


def _setup(record: dict) -> list[str]:
    c, v = record["config"], record["versions"]
    p, r = c["prune"], c["recover"]
    gran = (f"block {p['block_size'][0]}x{p['block_size'][1]}" if p["granularity"] == "block"
            else p["granularity"])
    lines = [f"- model: {c['model']['name_or_path']}; text: "
             f"{record.get('data', {}).get('note', c['data']['source'])}",
             f"- pruned: every decoder Linear, {p['pruner']} {gran} to {p['sparsity']:.0%} in "
             f"{p['steps']} step(s){' with OWL per-layer sparsity' if p['owl'] else ''}"
             + (f", each pruned layer then reconstructed ({p['reconstruct']} epoch(s) of Adam"
                + (f" at lr {record['reconstruct_lr']:g}" if record.get("reconstruct_lr")
                   else "") + " against the dense model's output of that layer on the "
                "calibration windows)"
                if p.get("reconstruct") else "") + "; "
             "the embedding / LM head stays dense",
             f"- recovery: {r['steps']} steps of distillation from the dense model (logits KL at "
             f"T={r['temperature']}" + (f", + {r['hidden_weight']} x hidden MSE" if
                                        r["hidden_weight"] else "") +
             f"), batch {r['batch_size']} x {r['seq_len']} tokens, lr {r['lr']}, pruned weights "
             "held at zero, embedding frozen",
             f"- speedup mode: {c['speedup']['mode']}",
             f"- versions: sparsekernels {v.get('sparsekernels')}, torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}, python {v.get('python')}, "
             f"{v.get('machine')}, {v.get('threads')} threads"]
    if record.get("seconds"):
        lines.append(f"- run time: {record['seconds'] / 60:.1f} min")
    return lines


def _report_text(record: dict) -> str:
    out = ["# LLM recipe report", ""]
    final, gen = record.get("final"), record.get("generation")
    if final:
        out += [f"**Perplexity {final['perplexity']:.2f} (x{final['vs_dense']:.2f} the dense "
                f"model's {final['dense_perplexity']:.2f}) at {_pct(final['sparsity'])} of "
                f"decoder-Linear weights; greedy decode x{final['decode_x']:.2f} and prefill "
                f"x{final['prefill_x']:.2f} the dense model's speed, measured side by side.**",
                ""]
    else:
        out += ["The run has not finished: what it measured so far is below.", ""]
    out += ["## Setup", ""] + _setup(record) + [""]
    points = record.get("points") or []
    if points:
        dense = (record.get("dense") or {}).get("perplexity")
        rows = [[pt["stage"], pt["step"], _pct(pt["sparsity"]), _num(pt["perplexity"], "{:.3f}"),
                 "n/a" if not dense else f"x{pt['perplexity'] / dense:.2f}"] for pt in points]
        if final:
            rows.append(["sped up (final)", "", _pct(final["sparsity"]),
                         _num(final["perplexity"], "{:.3f}"), f"x{final['vs_dense']:.2f}"])
        out += ["## Perplexity vs sparsity", "",
                "Evaluation articles, windows of consecutive tokens; each one-shot row is the "
                "model straight after that prune step, each recovered row after its recovery.",
                "", _table(["stage", "prune step", "sparsity", "perplexity", "vs dense"], rows),
                ""]
    losses = record.get("losses") or []
    if losses:
        first, last = losses[0], losses[-1]
        out += [f"Distillation loss (KL): {first['loss']:.3f} at the first recovery step, "
                f"{last['loss']:.3f} at the last.", ""]
    if gen:
        out += ["## Generation speed", "",
                f"Batch 1, greedy, transformers' generate() with its KV cache: a "
                f"{gen['prompt_tokens']}-token prompt (prefill) and {gen['new_tokens']} new "
                f"tokens (decode = (generate of all - prefill) / (new - 1)); medians of "
                f"{gen['reps']} rounds in which the two models take turns, {gen['threads']} "
                "threads.", "",
                _table(["model", "weights MB", "prefill ms", "prefill tokens/s", "decode ms/token",
                        "decode tokens/s"],
                       [[name, _num(gen[f"{name}_mb"], "{:.1f}"),
                         _num(gen[f"{name}_prefill_ms"], "{:.1f}"),
                         _num(gen[f"{name}_prefill_tok_s"], "{:.0f}"),
                         _num(gen[f"{name}_decode_ms"], "{:.2f}"),
                         _num(gen[f"{name}_tok_s"], "{:.1f}")] for name in ("dense", "pruned")]),
                "", f"Pruned vs dense: decode x{gen['decode_x']:.2f}, prefill "
                f"x{gen['prefill_x']:.2f}.", ""]
    out += _sweep_sections(record)
    answers = record.get("answers") or []
    if answers:
        out += ["## Answers side by side", "", "Greedy, the tokenizer's chat template.", ""]
        out.append(_table(["prompt", "dense", "pruned"],
                          [[a["prompt"], " ".join(a["dense"].split()),
                            " ".join(a["pruned"].split())] for a in answers]))
        out.append("")
    return "\n".join(out)


def _granularity_name(gran: str, block_size) -> str:
    if gran == "block":
        return f"block {block_size[0]}x{block_size[1]}"
    return "unstructured" if gran == "fine" else gran


def _sweep_sections(record: dict) -> list[str]:
    points, speed = record.get("sweep") or [], record.get("sweep_speed") or []
    if not points and not speed:
        return []
    p = record["config"]["prune"]
    out = []
    if points:
        sparsities = sorted({q["sparsity"] for q in points})
        cells: dict = {}
        for q in points:
            cells.setdefault((q["pruner"], q["granularity"]), {})[q["sparsity"]] = q
        rows = []
        for (pruner, gran), by_s in cells.items():
            rows.append([pruner, _granularity_name(gran, p["block_size"])] + [
                f"{by_s[s]['perplexity']:.2f} (x{by_s[s]['vs_dense']:.2f})" if s in by_s else ""
                for s in sparsities])
        out += ["## One-shot perplexity per pruner and granularity", "",
                "Each cell pruned one-shot from the dense weights (every decoder Linear, no "
                "recovery) and evaluated on the evaluation articles; in brackets, x the dense "
                "model's perplexity. An N:M pattern has one sparsity, 1 - N/M. Layer by layer "
                f"on the calibration windows; SparseGPT percdamp {p['percdamp']}, blocksize "
                f"{p['blocksize']}{'; OWL per-layer sparsity' if p['owl'] else ''}"
                + (f"; Wanda and SparseGPT with {p['reconstruct']} epoch(s) of local "
                   "reconstruction" if p.get("reconstruct") else "") + ".", "",
                _table(["pruner", "pattern"] + [_pct(s) for s in sparsities], rows), ""]
    if speed:
        rows = [[_pct(q["sparsity"]), _num(q["pruned_mb"], "{:.1f}"),
                 _num(q["dense_prefill_tok_s"], "{:.0f}"), _num(q["pruned_prefill_tok_s"],
                                                               "{:.0f}"),
                 f"x{q['prefill_x']:.2f}", _num(q["dense_tok_s"], "{:.1f}"),
                 _num(q["pruned_tok_s"], "{:.1f}"), f"x{q['decode_x']:.2f}"]
                for q in sorted(speed, key=lambda q: q["sparsity"])]
        gen = record.get("generation") or {}
        out += ["## Tokens/s vs sparsity", "",
                f"The {speed[0]['pruner']} {_granularity_name('block', p['block_size'])} "
                "models of the sweep, sped up as the final model is "
                f"({record['config']['speedup']['mode']}), each timed beside the dense model "
                "in the same run (greedy, batch 1, as in Generation speed"
                + (f": {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} new tokens"
                   if gen else "") + "). Only block patterns are timed: unstructured and N:M "
                "masks leave almost no block empty, so the kernels would have nothing to skip.",
                "",
                _table(["sparsity", "weights MB", "prefill tok/s dense", "prefill tok/s pruned",
                        "prefill x", "decode tok/s dense", "decode tok/s pruned", "decode x"],
                       rows), ""]
    return out


def write_llm_report(run_dir: str | os.PathLike, record: dict) -> Path:
    """Write run_dir/report.md and run_dir/record.json; returns the report's path."""
    run_dir = Path(run_dir)
    if not isinstance(record, dict) or not all(k in record for k in ("config", "versions")):
        raise ValueError("an LLM run record is a dict with at least config and versions")
    record = json.loads(json.dumps(record, default=_plain))
    text = _report_text(record)  # a record it cannot read fails here, before any write
    _write_text(run_dir / RECORD_FILE, json.dumps(record, indent=1))
    path = run_dir / REPORT_FILE
    _write_text(path, text)
    return path
