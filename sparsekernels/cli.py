"""The `sparsekernels` command.

  sparsekernels prune CONFIG [--full] [--resume] [--output-dir DIR]
                                                   the Transformer pruning recipe
  sparsekernels demo [--full] [--resume] [--ffn]   the recipe on the embedded default
                                                   (all-MiniLM-L6-v2, tweet sentiment)
  sparsekernels demo --llm [--resume]              the LLM recipe on SmolLM2-135M (BBC News)
  sparsekernels speedup MODEL MASKS -o OUT          masks -> a faster model (resize/kernel/auto)
  sparsekernels bench {linear,ffn,attention,model} ...
                                                   the benchmark scripts (source checkout;
                                                   `bench KIND --help` shows the script's options)
  sparsekernels report RUN_DIR                      (re)write a run's report

Exit codes: 0 success; 1 the job failed while running; 2 bad usage, bad config or a
missing file (one line, no traceback); 130 interrupted (a recipe run continues with --resume).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

EXAMPLE = """examples:
  sparsekernels demo                          # quick recipe run, minutes on 2 CPU cores
  sparsekernels prune configs/quick.yaml --resume
  sparsekernels demo --llm                    # SmolLM2 pruned one-shot, recovered, sped up
  sparsekernels speedup ./my-bert masks.safetensors --mode auto -o ./my-bert-fast
  sparsekernels report runs/demo
"""
BENCH_SCRIPTS = {"linear": "bench_bsr_linear.py", "ffn": "bench_ffn.py",
                 "attention": "bench_attention.py", "model": "bench_models.py"}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _bench(kind: str, rest: list[str]) -> int:
    script = Path(__file__).resolve().parents[1] / "bench" / BENCH_SCRIPTS[kind]
    if not script.exists():
        raise UsageError(f"{script} not found; `bench` runs from a source checkout "
                         "(git clone, then pip install -e . --no-build-isolation)")
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _prune(config_path: str | None, full: bool, resume: bool, output_dir: str | None) -> int:
    import dataclasses

    from sparsekernels.recipes.config import load_config, preset
    from sparsekernels.recipes.llm_config import LLMRecipeConfig
    from sparsekernels.recipes.transformer import run_recipe

    config = load_config(config_path, full=full) if config_path else preset("full" if full else "quick")
    if output_dir:
        config = dataclasses.replace(config, output_dir=output_dir)
    if isinstance(config, LLMRecipeConfig):
        return _prune_llm(config, resume)
    record = run_recipe(config, resume=resume)
    final = record.get("final", {})
    print(f"done: accuracy {final.get('accuracy', float('nan')):.2f} (dense "
          f"{final.get('dense_accuracy', float('nan')):.2f}) at encoder sparsity "
          f"{final.get('sparsity', float('nan')):.3f}, x{final.get('speedup') or float('nan'):.2f} "
          f"faster; report in {config.output_dir}/report.md")
    return 0


def _prune_llm(config, resume: bool) -> int:
    from sparsekernels.recipes.llm import run_llm_recipe

    final = run_llm_recipe(config, resume=resume).get("final", {})
    nan = float("nan")
    print(f"done: perplexity {final.get('perplexity', nan):.2f} (dense "
          f"{final.get('dense_perplexity', nan):.2f}) at decoder-Linear sparsity "
          f"{final.get('sparsity', nan):.3f}, decode x{final.get('decode_x', nan):.2f}; report in "
          f"{config.output_dir}/report.md")
    return 0


def _speedup(model_dir: str, masks_path: str, mode: str, output: str, seq_len: int) -> int:
    import torch
    import transformers

    from sparsekernels.formats.masks import MaskError, load_masks_file
    from sparsekernels.speedup import ModelSpeedup, save_model

    from sparsekernels.speedup.io import RECORD, load_model

    for p in (model_dir, masks_path):
        if not Path(p).exists():
            raise UsageError(f"{p} not found")
    if Path(output).exists() and not Path(output).is_dir():
        raise UsageError(f"-o {output} is a file; name a directory to save the model in")
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        if (Path(model_dir) / RECORD).exists():  # saved by sparsekernels (a recipe checkpoint)
            model = load_model(model_dir).eval()
        else:
            archs = getattr(config, "architectures", None) or ["AutoModel"]
            cls = getattr(transformers, archs[0], transformers.AutoModel)
            model = cls.from_pretrained(model_dir).eval()
    except (OSError, ValueError) as exc:
        raise UsageError(f"{model_dir} is not a transformers model directory ({exc})") from None
    try:
        masks = load_masks_file(masks_path)
    except MaskError:
        raise
    except Exception as exc:  # not a safetensors file at all
        raise UsageError(f"{masks_path} is not a masks file ({exc}); write one with a "
                         "pruner's export_model or sparsekernels.pruning.save_masks") from None
    vocab = getattr(config, "vocab_size", 1000)
    dummy = {"input_ids": torch.randint(0, vocab, (2, seq_len))}
    speedup = ModelSpeedup(model, dummy, masks, mode=mode)
    speedup.speedup_model()
    print(speedup.report)
    save_model(model, output)
    print(f"saved to {output} (load with sparsekernels.speedup.load_model)")
    return 0


def _report(run_dir: str) -> int:
    from sparsekernels.recipes.report import load_record, write_report

    if not (Path(run_dir) / "record.json").exists():
        raise UsageError(f"{run_dir} holds no run (record.json missing)")
    try:
        record = load_record(Path(run_dir))
        if isinstance(record.get("config"), dict) and record["config"].get("recipe") == "llm":
            from sparsekernels.recipes.llm_report import write_llm_report

            path = write_llm_report(Path(run_dir), record)
        else:
            path = write_report(Path(run_dir), record, write_record=False)
    except (ValueError, TypeError, KeyError) as exc:  # a damaged or foreign record.json
        raise UsageError(f"cannot report {run_dir}: {exc}") from None
    print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsekernels", description=__doc__, epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="run the Transformer pruning recipe from a config file")
    prune.add_argument("config", help="a YAML or JSON recipe config (see configs/)")
    demo = sub.add_parser("demo", help="the recipe on the embedded default model and task")
    for p in (prune, demo):
        p.add_argument("--full", action="store_true", help="the full configuration (a GPU's job)")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run")
        p.add_argument("--output-dir", default=None,
                       help="the run directory (default: the config's output_dir)")
    demo.add_argument("--ffn", action="store_true",
                      help="only the BERT-base FFN kernel speed table (seconds)")
    demo.add_argument("--llm", action="store_true",
                      help="the LLM recipe: SmolLM2-135M pruned to 50%% block 32x32 (SparseGPT), "
                           "recovered, sped up, perplexity and tokens/s (under 15 min, 2 cores)")
    demo.add_argument("--tokens", type=int, default=None, help="(--ffn) tokens (default 1024)")
    demo.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    speed = sub.add_parser("speedup", help="turn a model and its masks into a faster model")
    speed.add_argument("model", help="a transformers model directory")
    speed.add_argument("masks", help="a masks file (safetensors, from a pruner's export_model)")
    speed.add_argument("--mode", choices=("resize", "kernel", "auto"), default="auto",
                       help="resize: remove whole heads/units/channels; kernel: SparseLinear and "
                            "empty attention blocks; auto: both, dense where too dense to gain")
    speed.add_argument("--seq-len", type=int, default=16, help="dummy input length for tracing")
    speed.add_argument("-o", "--output", required=True, help="output directory")
    bench = sub.add_parser("bench", add_help=False,  # --help goes to the script
                           help="run a benchmark script (the arguments after KIND are its own)")
    bench.add_argument("kind", choices=sorted(BENCH_SCRIPTS))
    report = sub.add_parser("report", help="(re)write the report of a run directory")
    report.add_argument("run_dir")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if hasattr(sys.stdout, "reconfigure"):  # a log file (nohup, CI) gets each line as it is made
        sys.stdout.reconfigure(line_buffering=True)

    from sparsekernels.pruning.config import ConfigError
    from sparsekernels.formats.masks import MaskError
    from sparsekernels.recipes.config import RecipeConfigError
    from sparsekernels.recipes.tasks import TaskError

    try:
        if args.command == "bench":
            return _bench(args.kind, rest)
        if args.command == "prune":
            return _prune(args.config, args.full, args.resume, args.output_dir)
        if args.command == "demo":
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            if args.llm and args.ffn:
                raise UsageError("--llm and --ffn are two different demos; choose one")
            if args.tokens is not None and not args.ffn:
                raise UsageError("--tokens applies to demo --ffn only")
            if args.ffn:
                from sparsekernels import demo as ffn_demo

                if args.tokens is not None and args.tokens < 1:
                    raise UsageError(f"--tokens must be >= 1, got {args.tokens}")
                ffn_demo.run(tokens=1024 if args.tokens is None else args.tokens)
                return 0
            if args.llm:
                import dataclasses

                from sparsekernels.recipes.llm_config import llm_preset

                if args.full:
                    raise UsageError("demo --llm has no --full; run `sparsekernels prune "
                                     "configs/llm-medium.yaml` for the longer recovery")
                config = llm_preset("demo")
                if args.output_dir:
                    config = dataclasses.replace(config, output_dir=args.output_dir)
                return _prune_llm(config, args.resume)
            return _prune(None, args.full, args.resume, args.output_dir)
        if args.command == "speedup":
            return _speedup(args.model, args.masks, args.mode, args.output, args.seq_len)
        if args.command == "report":
            return _report(args.run_dir)
    except (UsageError, FileNotFoundError, RecipeConfigError, TaskError, ConfigError, MaskError) as exc:
        print(f"sparsekernels: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        runs_recipe = args.command == "prune" or (args.command == "demo" and not args.ffn)
        print("sparsekernels: interrupted" + ("; continue with --resume" if runs_recipe else ""),
              file=sys.stderr)
        return 130
    except Exception as exc:  # the job itself failed: say what, keep the trace short
        from sparsekernels.recipes.transformer import RecipeError

        if isinstance(exc, RecipeError):
            print(f"sparsekernels: error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
