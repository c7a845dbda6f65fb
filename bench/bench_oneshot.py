"""One-shot pruning of a real small LLM: evaluation perplexity per pruner, pattern and sparsity.

    python bench/bench_oneshot.py            # SmolLM2-135M-Instruct on BBC News (~40 min, 2 cores)
    python bench/bench_oneshot.py --smoke    # a tiny random Llama on random tokens, seconds (CI)
    python bench/bench_oneshot.py --cases sparsegpt/fine/0.5,wanda/2:4/0.5 --merge
    python bench/bench_oneshot.py --cases sparsegpt+owl/fine/0.7 --merge
    python bench/bench_oneshot.py --cases sparsegpt+rec/fine/0.5 --merge
    python bench/bench_oneshot.py --cases sparsegpt/fine/0.5 --calibration-windows 128
                                             # more calibration: oneshot-calib128.md

Results are written after every case; ``--merge`` keeps the saved rows of cases this run does
not repeat (same DataConfig only), so a long table can be run in parts.

Model: SmolLM2-135M-Instruct dequantized to fp32 (sparsekernels.recipes.llm_data). Pruned:
every decoder Linear (q, k, v, o, gate, up, down of all 30 layers), never the tied embedding /
LM head. Text: BBC News articles, deduplicated and split by article (seeded); calibration
windows come from the calibration articles, perplexity from the evaluation articles, and
nothing is tuned on the evaluation split (sizes and settings are fixed in DataConfig before
any run). Pruners: magnitude (LevelPruner), Wanda and SparseGPT (percdamp 0.01, blocksize
128), one-shot, no recovery. Patterns: unstructured and block 32x32 (what SparseLinear runs)
at 30 / 50 / 70%, and the N:M patterns 2:4 and 4:8, whose sparsity is 1 - N/M = 50% by
definition (other N:M, e.g. 3:4 / 1:4, on request). ``+owl`` runs a pruner with
outlier-weighted per-layer sparsity (``"owl": True``), ``+rec`` with local reconstruction
(``reconstruct=True``: each pruned layer trained against the dense model's output of that
layer on the calibration batches). Each case starts from the dense
weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from common import RESULTS, device_name, read_results, write_results  # noqa: E402

from sparsekernels.formats.masks import total_sparsity  # noqa: E402
from sparsekernels.pruning import LevelPruner, SparseGPTPruner, WandaPruner  # noqa: E402
from sparsekernels.pruning.pruners.reconstruct import DEFAULTS as REC  # noqa: E402

DECODER_LINEARS = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PRUNERS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class DataConfig:
    """What the model is calibrated and evaluated on (fixed before any run)."""

    seed: int = 0
    seq_len: int = 512
    calibration_windows: int = 16     # 8,192 tokens
    evaluation_windows: int = 16      # 8,192 tokens (8,176 predicted)
    batch_size: int = 4


@dataclass(frozen=True)
class Case:
    """One cell of the table: a pruner, a pattern ("fine", "block32", "N:M") and a sparsity
    (for N:M the pattern's own, 1 - N/M)."""

    pruner: str
    pattern: str
    sparsity: float
    owl: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    reconstruct: bool = False

    @property
    def name(self) -> str:
        return (f"{self.pruner}{'+owl' if self.owl else ''}{'+rec' if self.reconstruct else ''}"
                f"/{self.pattern}/{self.sparsity:g}")

    def config_list(self) -> list[dict]:
        entry: dict = {"op_types": ["Linear"], "op_names_re": [DECODER_LINEARS]}
        if self.owl:
            entry["owl"] = True
        if self.pattern == "fine":
            entry.update(granularity="fine", sparsity=self.sparsity)
        elif self.pattern.startswith("block"):
            b = int(self.pattern[len("block"):])
            entry.update(granularity="block", block_size=[b, b], sparsity=self.sparsity)
        else:
            entry.update(granularity=self.pattern)
        return [entry]


def nm_sparsity(pattern: str) -> float:
    n, m = (int(v) for v in pattern.split(":"))
    return (m - n) / m


def default_cases() -> list[Case]:
    cases = []
    for pruner in PRUNERS:
        for pattern in ("fine", "block32"):
            cases += [Case(pruner, pattern, s) for s in (0.3, 0.5, 0.7)]
        cases += [Case(pruner, p, nm_sparsity(p)) for p in ("2:4", "4:8")]
    cases += [Case(pruner, "fine", 0.7, owl=True) for pruner in ("wanda", "sparsegpt")]
    return cases


def by_priority(cases: list[Case]) -> list[Case]:
    """The targets' cells first (50% unstructured and 2:4), so a run cut short has them."""
    return sorted(cases, key=lambda c: not (c.pattern == "2:4" or (c.pattern == "fine" and
                                                                    c.sparsity == 0.5
                                                                    and not c.owl)))


def parse_cases(text: str) -> list[Case]:
    cases = []
    for item in text.split(","):
        pruner, pattern, sparsity = item.strip().split("/")
        rec = pruner.endswith("+rec")
        pruner = pruner.removesuffix("+rec")
        pruner, owl = pruner.removesuffix("+owl"), pruner.endswith("+owl")
        if pruner not in PRUNERS or ((owl or rec) and pruner == "magnitude"):
            raise SystemExit(f"unknown pruner {pruner!r}; one of {PRUNERS} (+owl, +rec or "
                             "+owl+rec for wanda and sparsegpt)")
        cases.append(Case(pruner, pattern, float(sparsity), owl=owl, reconstruct=rec))
    return cases


def prune(model, case: Case, calibration) -> None:
    config_list = case.config_list()
    if case.pruner == "magnitude":
        pruner = LevelPruner(model, config_list)
    elif case.pruner == "wanda":
        pruner = WandaPruner(model, config_list, calibration,
                             reconstruct=True if case.reconstruct else None)
    else:
        pruner = SparseGPTPruner(model, config_list, calibration, percdamp=case.percdamp,
                                 blocksize=case.blocksize,
                                 reconstruct=True if case.reconstruct else None)
    _, masks = pruner.compress()
    pruner.unwrap_model()       # zeros stay; evaluation runs without the mask hooks
    return total_sparsity(masks)


def load(smoke: bool, data: DataConfig):
    """(model, calibration batches, evaluation windows, description)."""
    from sparsekernels.recipes import llm_data
    if smoke:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(data.seed)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                          max_position_embeddings=data.seq_len)
        model = LlamaForCausalLM(cfg).eval()
        tokens = torch.randint(0, 256, (data.calibration_windows + data.evaluation_windows,
                                        data.seq_len))
        calib, evals = tokens[:data.calibration_windows], tokens[data.calibration_windows:]
        return model, list(calib.split(data.batch_size)), evals, "tiny random Llama"
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    model, tokenizer = llm_data.load_smollm2(torch.float32)
    split = llm_data.split_articles(llm_data.bbc_articles(), seed=data.seed)
    calib = llm_data.token_windows(tokenizer, split.calibration, data.seq_len,
                                   data.calibration_windows)
    evals = llm_data.token_windows(tokenizer, split.evaluation, data.seq_len,
                                   data.evaluation_windows)
    desc = (f"SmolLM2-135M-Instruct fp32; BBC articles: {len(split.evaluation)} evaluation / "
            f"{len(split.calibration)} calibration / {len(split.training)} training (seed "
            f"{data.seed})")
    return model, list(calib.split(data.batch_size)), evals, desc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--cases", default=None, help="pruner/pattern/sparsity,... (default: all)")
    p.add_argument("--merge", action="store_true",
                   help="keep saved rows of the cases this run does not repeat")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-windows", type=int, default=DataConfig.calibration_windows,
                   help="calibration windows of seq_len tokens (other than the default: its "
                   "own result file, oneshot-calib<N>; the evaluation split never changes)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.calibration_windows < 1:
        raise SystemExit(f"--calibration-windows must be >= 1, got {args.calibration_windows}")
    data = DataConfig(seq_len=32, calibration_windows=4, evaluation_windows=4) if args.smoke \
        else DataConfig(calibration_windows=args.calibration_windows)
    cases = parse_cases(args.cases) if args.cases else by_priority(default_cases())
    if args.smoke:
        cases = [c for c in cases if c.sparsity == 0.5 and c.pattern in ("fine", "2:4")] + \
                [Case("sparsegpt", "block16", 0.5), Case("wanda", "fine", 0.3, owl=True)]
    saved = []
    if args.merge and not args.smoke:
        names = {c.name for c in cases}
        saved = [r for r in read_results(RESULTS / device_name(torch.device("cpu"))
                                          / f"{result_name(data)}.csv")
                 if r["case"] != "dense" and r["case"] not in names
                 and r["data"] == data_key(data)]
        for r in saved:     # rows from before reconstruction existed, or had its lr column
            r.setdefault("reconstruct", 0)
            if int(r["reconstruct"]):
                r.setdefault("reconstruct_lr", 1e-4)  # the first default
            r["reconstruct_lr"] = float(r.get("reconstruct_lr") or 0)
        stale = [r["case"] for r in saved if int(r["reconstruct"])
                 and r["reconstruct_lr"] != REC["lr"]]
        if stale:
            print(f"dropped, reconstructed at another lr than today's {REC['lr']:g}: {stale}")
        saved = [r for r in saved if r["case"] not in stale]
    from sparsekernels.recipes.llm_data import perplexity
    t0 = time.perf_counter()
    model, calibration, evals, desc = load(args.smoke, data)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    t = time.perf_counter()
    dense = perplexity(model, evals, data.batch_size)
    rows = [dict(case="dense", pruner="dense", pattern="-", sparsity=0.0, owl=0, reconstruct=0,
                 reconstruct_lr=0.0, measured_sparsity=0.0, perplexity=dense, vs_dense=1.0,
                 prune_s=0.0, eval_s=time.perf_counter() - t, data=data_key(data))]
    print(f"loaded in {t - t0:.0f} s; dense perplexity {dense:.3f}", flush=True)
    for case in cases:
        model.load_state_dict(dense_state)
        t = time.perf_counter()
        measured = prune(model, case, calibration)
        prune_s = time.perf_counter() - t
        t = time.perf_counter()
        ppl = perplexity(model, evals, data.batch_size)
        rows.append(dict(case=case.name, pruner=case.pruner, pattern=case.pattern,
                         sparsity=case.sparsity, owl=int(case.owl),
                         reconstruct=int(case.reconstruct),
                         reconstruct_lr=REC["lr"] if case.reconstruct else 0.0,
                         measured_sparsity=measured,
                         perplexity=ppl, vs_dense=ppl / dense, prune_s=prune_s,
                         eval_s=time.perf_counter() - t, data=data_key(data)))
        print(f"{case.name}: perplexity {ppl:.3f} (x{ppl / dense:.2f} dense), sparsity "
              f"{measured:.4f}, prune {prune_s:.0f} s", flush=True)
        if not args.smoke:
            write(rows, saved, dense, desc, data, time.perf_counter() - t0)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def result_name(data: DataConfig) -> str:
    """oneshot for the fixed DataConfig; another calibration size keeps its own file."""
    if data == DataConfig():
        return "oneshot"
    return f"oneshot-calib{data.calibration_windows}"


def data_key(data: DataConfig) -> str:
    return ";".join(f"{k}={v}" for k, v in asdict(data).items())


def write(rows, saved, dense, desc, data, seconds) -> None:
    order = {c.name: i for i, c in enumerate(default_cases())}
    merged = rows[:1] + sorted(saved + rows[1:], key=lambda r: (order.get(r["case"], 1e9),
                                                                 r["case"]))
    notes = [f"- {desc}", f"- data: {asdict(data)}; windows of consecutive tokens, articles "
             "joined by the end-of-text token",
             "- pruned: q/k/v/o/gate/up/down of all 30 decoder layers (the embedding / LM head "
             "stays dense); one-shot, no recovery; each case starts from the dense weights",
             "- Wanda and SparseGPT run layer by layer (each layer calibrated on the outputs "
             "of the pruned layers before it); SparseGPT percdamp 0.01, blocksize 128; +owl: "
             "outlier-weighted per-layer sparsity (lambda 0.08, threshold 5); +rec: each pruned "
             "layer's kept weights then trained on the calibration batches to give the dense "
             f"model's output of that layer (reconstruct=True: {REC['epochs']} epochs of Adam at "
             f"lr {REC['lr']:g}, MSE)",
             "- N:M keeps N of every M consecutive input weights of each row: its sparsity is "
             "1 - N/M",
             f"- this run: {seconds / 60:.1f} min for {len(rows) - 1} cases (shared machine: "
             "times are indicative)"
             + (f"; {len(saved)} rows kept from earlier runs of the same data config "
                "(--merge)" if saved else "")]
    notes += ["", "Perplexity (x dense) by pattern and sparsity:", ""] + pivot(merged, dense)
    write_results(torch.device("cpu"), result_name(data),
                  "One-shot pruning: SmolLM2-135M-Instruct perplexity on BBC News"
                  + ("" if data == DataConfig() else
                     f" ({data.calibration_windows} calibration windows)"), merged,
                  notes=notes, md_columns=["case", "measured_sparsity", "perplexity",
                                           "vs_dense", "prune_s", "eval_s"])


def pivot(rows: list[dict], dense: float) -> list[str]:
    """A markdown table: one row per pruner x pattern family, one column per sparsity."""
    cells = {(r["pruner"], (int(r["owl"]), int(r.get("reconstruct") or 0)), r["pattern"],
              float(r["sparsity"])): r["perplexity"] for r in rows}
    cols = (0.25, 0.3, 0.5, 0.7, 0.75)
    used = [c for c in cols if any(k[3] == c for k in cells)]
    out = ["| pruner | pattern | " + " | ".join(f"{c:.0%}" for c in used) + " |",
           "|---|---|" + "---|" * len(used)]
    families = (("unstructured", ("fine",)), ("block 32x32", ("block32",)),
                ("N:4 (3:4, 2:4, 1:4)", ("3:4", "2:4", "1:4")), ("4:8", ("4:8",)))
    for pruner in PRUNERS:
        for owl in ((0, 0), (1, 0), (0, 1), (1, 1)):     # (OWL, reconstruction)
            for family, patterns in families:
                vals = []
                for c in used:
                    v = next((cells[(pruner, owl, p, c)] for p in patterns
                              if (pruner, owl, p, c) in cells), None)
                    vals.append("" if v is None else f"{v:.2f} (x{v / dense:.2f})")
                if any(vals):
                    name = pruner + (" + OWL" if owl[0] else "") + \
                        (" + reconstruction" if owl[1] else "")
                    out.append(f"| {name} | {family} | " + " | ".join(vals) + " |")
    return out


if __name__ == "__main__":
    sys.exit(main())
