"""The `sparsekernels` command.

    sparsekernels demo                  sparsify a BERT-base FFN and print the speed table
    sparsekernels bench linear [ARGS]   bench/bench_bsr_linear.py (from a source checkout)

Exit codes: 0 success, 1 failure while running, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

EXAMPLE = """example:
  sparsekernels demo --tokens 1024 --threads 2
  sparsekernels bench linear --smoke
"""
BENCH_SCRIPTS = {"linear": "bench_bsr_linear.py", "attention": "bench_attention.py",
                 "model": "bench_models.py"}


def _bench(kind: str, rest: list[str]) -> int:
    script = Path(__file__).resolve().parents[1] / "bench" / BENCH_SCRIPTS[kind]
    if not script.exists():
        print(f"sparsekernels: {script} not found; `bench` runs from a source checkout "
              "(git clone, then pip install -e . --no-build-isolation)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsekernels", description=__doc__,
                                     epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sparsify a BERT-base FFN and print the speed table")
    demo.add_argument("--tokens", type=int, default=1024)
    demo.add_argument("--block", type=int, default=32, choices=(16, 32, 64, 128))
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--reps", type=int, default=10)
    bench = sub.add_parser("bench", help="run a benchmark script (extra args are passed on)")
    bench.add_argument("kind", choices=sorted(BENCH_SCRIPTS))
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(args.kind, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from sparsekernels import demo as demo_module

    demo_module.run(tokens=args.tokens, block=args.block, threads=args.threads, reps=args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
