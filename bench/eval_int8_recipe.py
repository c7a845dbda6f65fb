"""The recipe's pruned model in int8: accuracy of a run's saved final model in fp32 and with
its Linear layers quantized (QuantizedSparseLinear), on the run's own evaluation set.

    python bench/eval_int8_recipe.py runs/demo-...     # a finished `sparsekernels demo` run

For a run made before the recipe had speedup.dtype (a run with `speedup: {dtype: int8}`
reports both accuracies itself). The saved model goes to int8 the way the recipe does it:
ModelSpeedup(mode="auto", dtype="int8") makes each encoder Linear a QuantizedSparseLinear
(int8 weights, per-output-channel scales; w8a8 for the evaluation batches, w8 at <= 16
tokens); the classifier head and any other layer stay fp32. Writes
bench/results/<device>/recipe_int8.{csv,md} (recipe_int8_<checkpoint> for another
checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import write_results  # noqa: E402

from sparsekernels import QuantizedSparseLinear  # noqa: E402
from sparsekernels.recipes.config import from_dict  # noqa: E402
from sparsekernels.recipes.training import accuracy  # noqa: E402
from sparsekernels.recipes.transformer import TransformerRecipe  # noqa: E402
from sparsekernels.speedup import ModelSpeedup  # noqa: E402


def quantize(model: nn.Module, dummy: dict) -> list[str]:
    """The recipe's own way to int8 (speedup.dtype: int8): ModelSpeedup in auto mode, which
    stores every encoder Linear whole and quantizes it; returns the layers it quantized."""
    ModelSpeedup(model, dummy, {}, mode="auto", dtype="int8").speedup_model()
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedSparseLinear)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", default="final_model",
                   help="which saved model of the run (final_model; teacher: the fine-tuned dense)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sparsekernels.recipes.checkpoint import RunDir

    record = RunDir(args.run_dir).load_record()
    config = from_dict(record["config"])
    recipe = TransformerRecipe(config, resume=True, log=lambda m: None)
    recipe._prepare_data()  # the run's own tokenizer, split and evaluation batches
    model = recipe._load(args.checkpoint).eval()
    rows = []
    with torch.no_grad():
        t0 = time.perf_counter()
        acc32 = accuracy(model, recipe.eval_batches)
        t32 = time.perf_counter() - t0
        names = quantize(model, recipe.dummy)
        t0 = time.perf_counter()
        acc8 = accuracy(model, recipe.eval_batches)
        t8 = time.perf_counter() - t0
    n_eval = sum(int(b["labels"].numel()) for b in recipe.eval_batches)
    rows.append({"run": Path(args.run_dir).name, "checkpoint": args.checkpoint,
                 "model": config.model.name_or_path,
                 "eval_examples": n_eval, "quantized_linears": len(names),
                 "recorded_final_accuracy": record.get("final", {}).get("accuracy", float("nan")),
                 "fp32_accuracy": acc32, "int8_accuracy": acc8, "int8_minus_fp32": acc8 - acc32,
                 "fp32_eval_s": t32, "int8_eval_s": t8})
    print(rows[0])
    notes = ["- the run's saved final model (resize mode), evaluated in fp32 and with every "
             "encoder Linear as QuantizedSparseLinear (int8 weights, per-channel scales; dynamic "
             "per-token int8 activations); target |int8 - fp32| <= 0.5 point",
             "- eval times are whole passes on a shared machine: not a benchmark"]
    name = "recipe_int8" if args.checkpoint == "final_model" else f"recipe_int8_{args.checkpoint}"
    out = write_results(torch.device("cpu"), name, f"The recipe's {args.checkpoint} in int8",
                        rows, notes)
    print(f"wrote {out}/{name}.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
