"""The LLM recipe's report: report.md (and record.json) in the run directory.

    path = write_llm_report(run_dir, record)

record (written by recipes/llm.py; every section but config and versions optional):
  dense       {"perplexity", "params"}
  points      [{"stage": dense|one-shot|recovered, "step", "sparsity", "perplexity"}]
  generation  {"dense_decode_ms", "pruned_decode_ms", "decode_x", "prefill_x", ...}
  answers     [{"prompt", "dense", "pruned"}]
  final       {"perplexity", "masked_perplexity", "dense_perplexity", "sparsity", ...}
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
             f"{p['steps']} step(s){' with OWL per-layer sparsity' if p['owl'] else ''}; "
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
    answers = record.get("answers") or []
    if answers:
        out += ["## Answers side by side", "", "Greedy, the tokenizer's chat template.", ""]
        out.append(_table(["prompt", "dense", "pruned"],
                          [[a["prompt"], " ".join(a["dense"].split()),
                            " ".join(a["pruned"].split())] for a in answers]))
        out.append("")
    return "\n".join(out)


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
