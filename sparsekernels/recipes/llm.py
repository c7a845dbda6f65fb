"""The LLM recipe: a causal LM from dense to a faster pruned model, its quality measured.

Stages, each checkpointed atomically (checkpoint.py) so ``resume=True`` continues from the
last committed state:
  dense    load the model, measure its perplexity on the evaluation articles
  prune    ``prune.steps`` times: one-shot prune every decoder Linear (SparseGPT, Wanda or
           magnitude; block, fine or N:M) a step closer to the target, then recover with
           distillation from the dense model (its share of ``recover.steps``), the pruned
           weights held at zero; perplexity after each prune and each recovery
  final    speed up (``speedup.mode``: auto resizes what is whole and runs kernels for the
           rest), measure perplexity again, greedy prefill and decode tokens/s of the dense
           and the pruned model taking turns, answers to a few prompts side by side, report
  sweep    (when ``sweep.pruners`` lists any) one-shot from the dense weights per pruner x
           granularity x sparsity, perplexity of each; the block pattern sped up and timed
           beside the dense model per sparsity; each point committed as it is measured
The dense model is the teacher and is reloaded from its source, never checkpointed.
Recovery checkpoints every ``checkpoint_minutes`` with the optimizer's state and the RNG.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels.recipes.checkpoint import RunDir
from sparsekernels.recipes.llm_config import EMBEDDED_LLM, LLMPruneConfig, LLMRecipeConfig
from sparsekernels.recipes.progress import progress
from sparsekernels.recipes.training import cycle, make_optimizer, param_shapes
from sparsekernels.recipes.transformer import (RecipeError, hold_run, open_run,
                                               quiet_transformers, versions)

STAGES = ("dense", "prune", "final", "sweep")
_CHUNK = 10  # recovery steps between looks at the checkpoint clock


def decoder_linears(model: nn.Module) -> list[str]:
    """Every Linear inside the model map's decoder layers (never the embedding / LM head)."""
    from sparsekernels.arch import layer_linears

    names = layer_linears(model, types=("Linear",))
    if not names:
        raise RecipeError(f"found no decoder layers with Linear weights in "
                          f"{type(model).__name__}; sparsekernels.arch.describe(model) shows "
                          "what the model map finds")
    return names


def distillation_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor,
                      temperature: float, hidden_weight: float) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at ``temperature`` (x T^2, the
    usual scale), mean over tokens, plus ``hidden_weight`` x MSE of the last hidden states."""
    hidden = hidden_weight > 0
    with torch.no_grad():
        t = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    s = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    vocab = s.logits.shape[-1]
    loss = F.kl_div(F.log_softmax(s.logits.float().reshape(-1, vocab) / temperature, -1),
                    F.log_softmax(t.logits.float().reshape(-1, vocab) / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature ** 2
    if hidden:
        loss = loss + hidden_weight * F.mse_loss(s.hidden_states[-1], t.hidden_states[-1])
    return loss


def step_targets(sparsity: float, steps: int) -> list[float]:
    """The sparsity after each prune step: equal steps up to the target."""
    return [round(sparsity * (i + 1) / steps, 6) for i in range(steps)]


def recovery_shares(total: int, steps: int) -> list[int]:
    """Recovery steps after each prune step (the remainder goes to the last)."""
    share = total // steps
    return [share] * (steps - 1) + [total - share * (steps - 1)]


class LLMRecipe:
    def __init__(self, config: LLMRecipeConfig, resume: bool = False,
                 log: Callable[[str], None] = print):
        self.config = config
        self._log = log
        self.run_dir = RunDir(config.output_dir)
        recorded = open_run(self.run_dir, resume, config.to_dict())
        self._saved_at = time.monotonic()
        self.record = recorded if recorded is not None else {
            "config": config.to_dict(), "versions": versions(), "seed": config.seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages_done": [], "points": []}
        self.tokenizer = None

    def log(self, message: str) -> None:
        self._log(message)

    def _tag(self, stage: int) -> str:
        return f"[{stage}/{4 if self.config.sweep.pruners else 3}]"

    # -- model and data -----------------------------------------------------------------
    def _load_dense(self) -> nn.Module:
        """The dense model from its source (the embedded SmolLM2 or a directory), eval mode."""
        name = self.config.model.name_or_path
        with quiet_transformers():
            if name == EMBEDDED_LLM:
                from sparsekernels.recipes.llm_data import load_smollm2
                model, self.tokenizer = load_smollm2(torch.float32)
                return model.eval()
            from transformers import AutoModelForCausalLM, AutoTokenizer
            try:
                model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
            except (OSError, ValueError) as exc:
                raise RecipeError(f"model.name_or_path: cannot load a causal LM from {name} "
                                  f"({exc})") from None
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(name)
            except Exception as exc:  # missing files raise OSError, ImportError, ... by version
                if self.config.data.source != "random":
                    raise RecipeError(f"model.name_or_path: no tokenizer loads from {name} "
                                      f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                                      "), which data.source bbc needs (or use data.source: "
                                      "random to check the pipeline)") from None
                self.tokenizer = None
        return model.eval()

    def _prepare_data(self, vocab_size: int) -> None:
        d, r = self.config.data, self.config.recover
        need_train = r.steps * r.batch_size
        if d.source == "random":
            g = torch.Generator().manual_seed(d.seed)

            def draw(n: int, length: int) -> torch.Tensor:
                return torch.randint(0, vocab_size, (n, length), generator=g)

            calib = draw(d.calibration_windows, d.seq_len)
            evals = draw(d.evaluation_windows, d.seq_len)
            train = draw(max(need_train, 1), r.seq_len)
            self.split_note = f"uniform random tokens (seed {d.seed}): perplexity means nothing"
        else:
            from sparsekernels.recipes import llm_data
            articles = llm_data.bbc_articles(d.articles_dir)
            split = llm_data.split_articles(articles, seed=d.seed)
            calib = llm_data.token_windows(self.tokenizer, split.calibration, d.seq_len,
                                           d.calibration_windows)
            evals = llm_data.token_windows(self.tokenizer, split.evaluation, d.seq_len,
                                           d.evaluation_windows)
            train = llm_data.token_windows(self.tokenizer, split.training, r.seq_len)
            train = train[:max(need_train, 1)]
            self.split_note = (f"{len(split.evaluation)} evaluation / {len(split.calibration)} "
                               f"calibration / {len(split.training)} training articles (seed "
                               f"{d.seed}), split by article")
        self.calibration = list(calib.split(d.batch_size))
        self.evaluation = evals
        self.train_batches = [{"input_ids": b} for b in train.split(r.batch_size)
                              if b.shape[0] == r.batch_size] or [{"input_ids": train}]
        self.record["data"] = {"note": self.split_note,
                               "calibration_tokens": int(calib.numel()),
                               "evaluation_tokens": int(evals.numel()),
                               "training_tokens": int(train.numel())}

    def _perplexity(self, model: nn.Module) -> float:
        from sparsekernels.recipes.llm_data import perplexity
        return perplexity(model, self.evaluation, self.config.data.batch_size)

    # -- checkpoints --------------------------------------------------------------------
    def _save_student(self, model: nn.Module, masks: dict, objects: dict | None = None) -> None:
        extra = {"masks": {name: m.to(torch.uint8) for name, m in masks.items()}}
        self.run_dir.save_checkpoint(self.record, "student", "student", model, extra, objects)
        self._saved_at = time.monotonic()

    def _load_student(self) -> tuple[nn.Module, dict]:
        from safetensors.torch import load_file

        from sparsekernels.speedup.io import load_model
        path = self.run_dir.path(self.record["student"])
        model = load_model(path).eval()
        raw = load_file(str(path / "masks.safetensors"))
        masks = {}
        for name, m in raw.items():
            try:
                weight = model.get_submodule(name).weight
            except AttributeError:
                raise RecipeError(f"{path}: the masks name {name}, which the model lacks; the "
                                  "checkpoint is damaged, start a new run") from None
            if m.shape != weight.shape or m.dtype != torch.uint8 or bool((m > 1).any()):
                raise RecipeError(f"{path}: the mask of {name} is not a 0/1 tensor shaped like "
                                  "its weight; the checkpoint is damaged, start a new run")
            masks[name] = m.bool()
        return model, masks

    # -- stages -------------------------------------------------------------------------
    def stage_dense(self) -> None:
        self.log(f"{self._tag(1)} dense model: perplexity on the evaluation articles")
        t0 = time.perf_counter()
        ppl = self._perplexity(self.teacher)
        n = sum(p.numel() for p in self.teacher.parameters())
        self.record["dense"] = {"perplexity": ppl, "params": n,
                                "eval_s": time.perf_counter() - t0}
        self.record["points"].append({"stage": "dense", "step": 0, "sparsity": 0.0,
                                      "perplexity": ppl})
        self.log(f"  dense perplexity {ppl:.3f} ({n / 1e6:.1f}M parameters)")
        self.record["stages_done"].append("dense")
        self.run_dir.commit(self.record)

    @staticmethod
    def _config_list(p: LLMPruneConfig, names: list[str], sparsity: float) -> list[dict]:
        entry: dict = {"op_names": names, "sparsity": sparsity}
        if p.granularity == "block":
            entry.update(granularity="block", block_size=list(p.block_size))
        else:
            entry["granularity"] = p.granularity
        if p.owl:
            entry["owl"] = True
        return [entry]

    def _one_shot(self, model: nn.Module, names: list[str], sparsity: float,
                  masks: dict, p: LLMPruneConfig | None = None) -> dict:
        """Prune ``model`` in place to ``sparsity`` (``p``: the prune section, or another
        pruner / granularity for the sweep); the new masks keep every earlier zero."""
        from sparsekernels.pruning import LevelPruner, SparseGPTPruner, WandaPruner
        p = p or self.config.prune
        config_list = self._config_list(p, names, sparsity)
        if p.pruner == "magnitude":
            pruner = LevelPruner(model, config_list)
        elif p.pruner == "wanda":
            pruner = WandaPruner(model, config_list, self.calibration,
                                 reconstruct=p.reconstruct or None)
        else:
            pruner = SparseGPTPruner(model, config_list, self.calibration, percdamp=p.percdamp,
                                     blocksize=p.blocksize, reconstruct=p.reconstruct or None)
        _, found = pruner.compress()
        pruner.unwrap_model()
        out = {}
        with torch.no_grad():
            for name in names:
                keep = found[name]["weight"].bool() if name in found else torch.ones_like(
                    model.get_submodule(name).weight, dtype=torch.bool)
                if name in masks:
                    keep &= masks[name]
                model.get_submodule(name).weight.mul_(keep)
                out[name] = keep
        return out

    @staticmethod
    def _sparsity(masks: dict) -> float:
        total = sum(m.numel() for m in masks.values())
        return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)

    def _point(self, stage: str, step: int, model: nn.Module, masks: dict) -> dict:
        ppl = self._perplexity(model)
        point = {"stage": stage, "step": step, "sparsity": self._sparsity(masks),
                 "perplexity": ppl,
                 "vs_dense": ppl / self.record["dense"]["perplexity"]}
        self.record["points"].append(point)
        self.log(f"  {stage}: perplexity {ppl:.3f} (x{point['vs_dense']:.2f} dense) at "
                 f"decoder-Linear sparsity {point['sparsity']:.3f}")
        return point

    def stage_prune(self) -> None:
        cfg = self.config
        targets = step_targets(cfg.prune.sparsity, cfg.prune.steps)
        shares = recovery_shares(cfg.recover.steps, cfg.prune.steps)
        state = self.record.setdefault("prune_progress", {"step": 0, "recovered": 0,
                                                          "pruned": False})
        if state["step"] or state["pruned"]:
            student, masks = self._load_student()
        else:
            student, masks = copy.deepcopy(self.teacher), {}
        names = decoder_linears(student)
        while state["step"] < len(targets):
            i = state["step"]
            if not state["pruned"]:
                self.log(f"{self._tag(2)} prune step {i + 1}/{len(targets)}: {cfg.prune.pruner} "
                         f"{cfg.prune.granularity} to sparsity {targets[i]:.4g} in every "
                         "decoder Linear")
                t0 = time.perf_counter()
                masks = self._one_shot(student, names, targets[i], masks)
                self.record.setdefault("prune_s", []).append(time.perf_counter() - t0)
                if self.config.prune.reconstruct:  # the report names the step size used
                    from sparsekernels.pruning.pruners.reconstruct import DEFAULTS
                    self.record["reconstruct_lr"] = DEFAULTS["lr"]
                self._point("one-shot", i + 1, student, masks)
                state.update(pruned=True, recovered=0)
                self._save_student(student, masks)
            if shares[i]:
                self._recover(student, masks, i, shares[i], state)
                self._point("recovered", i + 1, student, masks)
            state.update(step=i + 1, pruned=False, recovered=0)
            self._save_student(student, masks)
        self.record["stages_done"].append("prune")
        self.run_dir.commit(self.record)

    def _recover(self, student: nn.Module, masks: dict, index: int, steps: int,
                 state: dict) -> None:
        cfg = self.config.recover
        student.train()
        # the tied embedding / LM head stays as it is (a quarter of SmolLM2's weights, and
        # not pruned); everything else trains
        embed = student.get_input_embeddings().weight
        params = [p for p in student.parameters() if p is not embed]
        for p in student.parameters():
            p.requires_grad_(p is not embed)
        opt, sched = make_optimizer(params, cfg.lr, steps, cfg.warmup_ratio, cfg.weight_decay)
        done = state["recovered"]
        if done:
            self._restore_training(opt, sched)
        else:
            self._seed(index)
        hooks = [student.get_submodule(n).weight.register_hook(lambda g, m=m: g * m)
                 for n, m in masks.items()]  # pruned weights get no gradient: Adam keeps 0
        seen = sum(recovery_shares(self.config.recover.steps, self.config.prune.steps)[:index])
        batches = cycle(self.train_batches, self.config.seed, skip=seen + done)
        every = 60 * self.config.checkpoint_minutes
        bar = progress(steps, f"recover {index + 1}", self._log, initial=done)
        try:
            while done < steps:
                for _ in range(min(_CHUNK, steps - done)):
                    ids = next(batches)["input_ids"]
                    loss = distillation_loss(student, self.teacher, ids, cfg.temperature,
                                             cfg.hidden_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    done += 1
                    self.record.setdefault("losses", []).append(
                        {"prune_step": index + 1, "step": done, "loss": loss.item()})
                    bar.update(1)
                    bar.set_postfix(kl=f"{loss.item():.3f}")
                state["recovered"] = done
                if every and done < steps and time.monotonic() - self._saved_at >= every:
                    self._save_student(student, masks, {"training": {
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(), "py_rng": random.getstate(),
                        "shapes": param_shapes(opt)}})
        finally:
            bar.close()
            for h in hooks:
                h.remove()
            student.eval()
        for n, m in masks.items():  # the zeros held (a failure here is a bug, not bad input)
            w = student.get_submodule(n).weight
            if bool((w.detach()[~m] != 0).any()):
                raise RecipeError(f"recovery moved pruned weights of {n}; please report it")

    def _seed(self, index: int) -> None:
        random.seed(self.config.seed + index)
        torch.manual_seed(self.config.seed + index)

    def _restore_training(self, opt, sched) -> None:
        path = self.run_dir.path(self.record["student"]) / "training.pt"
        if not path.exists():
            raise RecipeError(f"{path} is missing: the record says recovery stopped midway, but "
                              "its checkpoint has no optimizer state; start a new run with "
                              "--output-dir")
        state = torch.load(path, weights_only=True)
        if state.get("shapes") != param_shapes(opt):
            raise RecipeError(f"{path} holds the optimizer state of other parameters; start a "
                              "new run with --output-dir")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        random.setstate(state["py_rng"])

    def _speed_up(self, model: nn.Module, masks: dict) -> float:
        """Speed ``model`` up in place (speedup.mode) from its masks; returns the seconds."""
        from sparsekernels.speedup import ModelSpeedup
        dummy = {"input_ids": self.evaluation[:1, :min(64, self.evaluation.shape[1])]}
        t0 = time.perf_counter()
        ModelSpeedup(model, dummy, {n: {"weight": m.float()} for n, m in masks.items()},
                     mode=self.config.speedup.mode,
                     block_size=tuple(self.config.prune.block_size)).speedup_model()
        model.eval()
        return time.perf_counter() - t0

    def stage_final(self) -> None:
        from sparsekernels.recipes import llm_bench
        from sparsekernels.recipes.llm_report import write_llm_report
        from sparsekernels.speedup.io import save_model

        cfg = self.config
        student, masks = self._load_student()
        self.log(f"{self._tag(3)} speed up ({cfg.speedup.mode}), evaluate, time generation, report")
        masked_ppl = self._perplexity(student)
        speedup_s = self._speed_up(student, masks)
        final_ppl = self._perplexity(student)
        if not math.isclose(final_ppl, masked_ppl, rel_tol=1e-3):
            raise RecipeError(f"the sped-up model's perplexity {final_ppl:.4f} differs from the "
                              f"masked model's {masked_ppl:.4f}; please report it")
        ids = self.evaluation[:1, :cfg.bench.prompt_tokens]
        self.log(f"  perplexity {final_ppl:.3f} (masked {masked_ppl:.3f}); timing greedy "
                 f"generation: {ids.shape[1]}-token prompt, {cfg.bench.new_tokens} new tokens, "
                 f"{cfg.bench.reps} rounds, {torch.get_num_threads()} threads")
        timing = llm_bench.time_generation({"dense": self.teacher, "pruned": student}, ids,
                                           cfg.bench.new_tokens, cfg.bench.reps)
        answers = []
        if self.tokenizer is not None:
            for prompt in cfg.bench.prompts:
                answers.append({"prompt": prompt,
                                "dense": llm_bench.answer(self.teacher, self.tokenizer, prompt,
                                                          cfg.bench.answer_tokens),
                                "pruned": llm_bench.answer(student, self.tokenizer, prompt,
                                                           cfg.bench.answer_tokens)})
        d, s = timing["dense"], timing["pruned"]
        self.record["generation"] = {
            "prompt_tokens": int(ids.shape[1]), "new_tokens": cfg.bench.new_tokens,
            "reps": cfg.bench.reps, "threads": torch.get_num_threads(), **{
                f"{k}_{v}": timing[k][v] for k in timing for v in timing[k]},
            "decode_x": d["decode_ms"] / s["decode_ms"],
            "prefill_x": d["prefill_ms"] / s["prefill_ms"],
            "dense_mb": llm_bench.stored_bytes(self.teacher) / 2**20,
            "pruned_mb": llm_bench.stored_bytes(student) / 2**20}
        self.record["answers"] = answers
        self.record["final"] = {"perplexity": final_ppl, "masked_perplexity": masked_ppl,
                                "dense_perplexity": self.record["dense"]["perplexity"],
                                "vs_dense": final_ppl / self.record["dense"]["perplexity"],
                                "sparsity": self._sparsity(masks), "speedup_s": speedup_s,
                                "decode_x": self.record["generation"]["decode_x"],
                                "prefill_x": self.record["generation"]["prefill_x"]}
        self.log(f"  decode {d['tok_s']:.1f} -> {s['tok_s']:.1f} tokens/s "
                 f"(x{self.record['final']['decode_x']:.2f}), prefill "
                 f"x{self.record['final']['prefill_x']:.2f}")
        rel = self.run_dir.new_name(self.record, "final")
        save_model(student, self.run_dir.path(rel))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(self.run_dir.path(rel)))
        self.record["final_model"] = rel
        self.record["stages_done"].append("final")
        self.log(f"report: {write_llm_report(self.run_dir.root, self.record)}")

    def stage_sweep(self) -> None:
        """Each point from the dense weights; points already recorded (same pruner,
        granularity and sparsity) are kept, so a resumed or extended sweep adds the rest."""
        from sparsekernels.recipes import llm_bench
        from sparsekernels.recipes.llm_report import write_llm_report

        cfg, w = self.config, self.config.sweep
        cases = w.cases()
        if not cases:
            return
        points = self.record.setdefault("sweep", [])
        speed = self.record.setdefault("sweep_speed", [])
        done = {(q["pruner"], q["granularity"], q["sparsity"]) for q in points}
        timed = {q["sparsity"] for q in speed}
        todo = [c for c in cases if c not in done or (self._timed(c) and c[2] not in timed)]
        self.log(f"{self._tag(4)} one-shot sweep: {len(todo)} of {len(cases)} points to "
                 "measure, each pruned from the dense weights" + (
                     f"; {cfg.prune.pruner} block timed beside the dense model" if w.speed
                     else ""))
        names = decoder_linears(self.teacher)
        dense_ppl = self.record["dense"]["perplexity"]
        for pruner, gran, sparsity in todo:
            p = dataclasses.replace(cfg.prune, pruner=pruner, granularity=gran,
                                    sparsity=sparsity, steps=1)
            model = copy.deepcopy(self.teacher)
            t0 = time.perf_counter()
            masks = self._one_shot(model, names, sparsity, {}, p)
            prune_s = time.perf_counter() - t0
            if (pruner, gran, sparsity) not in done:
                ppl = self._perplexity(model)
                points.append({"pruner": pruner, "granularity": gran, "sparsity": sparsity,
                               "measured_sparsity": self._sparsity(masks), "perplexity": ppl,
                               "vs_dense": ppl / dense_ppl, "prune_s": prune_s})
                self.log(f"  {pruner} {gran} {sparsity:g}: perplexity {ppl:.3f} "
                         f"(x{ppl / dense_ppl:.2f} dense), pruned in {prune_s:.0f} s")
            if self._timed((pruner, gran, sparsity)) and sparsity not in timed:
                self._speed_up(model, masks)
                t = llm_bench.time_generation(
                    {"dense": self.teacher, "pruned": model},
                    self.evaluation[:1, :cfg.bench.prompt_tokens], cfg.bench.new_tokens,
                    cfg.bench.reps)
                d, s = t["dense"], t["pruned"]
                speed.append({"sparsity": sparsity, "pruner": pruner,
                              "pruned_mb": llm_bench.stored_bytes(model) / 2**20,
                              "dense_tok_s": d["tok_s"], "pruned_tok_s": s["tok_s"],
                              "dense_prefill_tok_s": d["prefill_tok_s"],
                              "pruned_prefill_tok_s": s["prefill_tok_s"],
                              "decode_x": d["decode_ms"] / s["decode_ms"],
                              "prefill_x": d["prefill_ms"] / s["prefill_ms"]})
                timed.add(sparsity)
                self.log(f"  timed at {sparsity:g}: decode {d['tok_s']:.1f} -> "
                         f"{s['tok_s']:.1f} tokens/s (x{speed[-1]['decode_x']:.2f}), prefill "
                         f"x{speed[-1]['prefill_x']:.2f}")
            del model, masks
            self.run_dir.commit(self.record)
        self.log(f"report: {write_llm_report(self.run_dir.root, self.record)}")

    def _timed(self, case: tuple[str, str, float]) -> bool:
        w = self.config.sweep
        return w.speed and case[0] == self.config.prune.pruner and case[1] == "block"

    # -- driver -------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.config
        if cfg.bench.threads:
            torch.set_num_threads(cfg.bench.threads)
        hold_run(self.run_dir)
        try:
            t0 = time.perf_counter()
            self.teacher = self._load_dense()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self._prepare_data(self.teacher.config.vocab_size)
            self.log(f"loaded {cfg.model.name_or_path} and the text in "
                     f"{time.perf_counter() - t0:.0f} s: {self.split_note}")
            self.run_dir.commit(self.record)
            for stage in STAGES:
                if stage in self.record["stages_done"]:  # the sweep never is: see stage_sweep
                    self.log(f"[resume] {stage}: done, skipped")
                    continue
                getattr(self, f"stage_{stage}")()
            self.record["seconds"] = self.record.get("seconds", 0) + time.perf_counter() - t0
            self.run_dir.commit(self.record)
            return self.record
        finally:
            self.run_dir.unlock()


def run_llm_recipe(config: LLMRecipeConfig, resume: bool = False, log=print) -> dict:
    return LLMRecipe(config, resume=resume, log=log).run()
