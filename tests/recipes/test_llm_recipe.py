"""The LLM recipe (recipes/llm.py) end to end on a tiny random Llama and random tokens:
stages, masks held through recovery, the sped-up model equal to the masked one, resume from
every checkpoint, config checks, the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from sparsekernels.recipes.config import RecipeConfigError, load_config  # noqa: E402
from sparsekernels.recipes.llm import (LLMRecipe, decoder_linears, distillation_loss,  # noqa: E402
                                       recovery_shares, run_llm_recipe, step_targets)
from sparsekernels.recipes.llm_config import (LLMRecipeConfig, llm_from_dict,  # noqa: E402
                                              llm_preset)
from sparsekernels.recipes.transformer import RecipeError  # noqa: E402


def tiny_llama(path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=128, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def config(tmp_path, **over) -> LLMRecipeConfig:
    data = {"recipe": "llm", "model": {"name_or_path": str(tiny_llama(tmp_path / "model"))},
            "data": {"source": "random", "seq_len": 32, "calibration_windows": 4,
                     "evaluation_windows": 4, "batch_size": 2},
            "prune": {"sparsity": 0.5, "steps": 2},
            "recover": {"steps": 24, "batch_size": 2, "seq_len": 16, "lr": 1e-3},
            "bench": {"prompt_tokens": 8, "new_tokens": 3, "reps": 1},
            "checkpoint_minutes": 0, "output_dir": str(tmp_path / "run")}
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return llm_from_dict(data)


def test_end_to_end(tmp_path):
    cfg = config(tmp_path)
    record = run_llm_recipe(cfg, log=lambda m: None)
    assert record["stages_done"] == ["dense", "prune", "final"]
    stages = [p["stage"] for p in record["points"]]
    assert stages == ["dense", "one-shot", "recovered", "one-shot", "recovered"]
    # a later step only adds zeros, and the block pattern reaches the target
    sparsities = [p["sparsity"] for p in record["points"][1:]]
    assert sparsities[0] == sparsities[1] < sparsities[2] == sparsities[3]
    assert sparsities[2] >= 0.5
    final = record["final"]
    assert final["perplexity"] == pytest.approx(final["masked_perplexity"], rel=1e-3)
    assert final["perplexity"] == pytest.approx(record["points"][-1]["perplexity"], rel=1e-5)
    losses = [entry["loss"] for entry in record["losses"]]
    assert len(losses) == 24 and all(math.isfinite(v) and v >= 0 for v in losses)

    # the saved final model loads and gives the masked student's logits
    from sparsekernels.nn import SparseLinear
    from sparsekernels.speedup.io import load_model

    run = tmp_path / "run"
    final_model = load_model(run / record["final_model"]).eval()
    assert any(isinstance(m, SparseLinear) for m in final_model.modules())
    recipe = LLMRecipe(cfg, resume=True, log=lambda m: None)
    student, masks = recipe._load_student()
    assert set(masks) == set(decoder_linears(student))
    for name, keep in masks.items():
        w = student.get_submodule(name).weight
        assert not bool(w[~keep].any())
        block = keep.reshape(keep.shape[0] // 32, 32, keep.shape[1] // 32, 32)
        assert bool((block.all(3).all(1) | ~block.any(3).any(1)).all())  # whole 32x32 blocks
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        want = student(input_ids=ids).logits.double()
        got = final_model(input_ids=ids).logits
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
    report = (run / "report.md").read_text()
    assert "## Perplexity vs sparsity" in report and "## Generation speed" in report
    assert json.loads((run / "record.json").read_text())["final"]["sparsity"] == final["sparsity"]


class Stop(Exception):
    pass


def stop_at(text):
    def log(message):
        if text in message:
            raise Stop(message)
    return log


@pytest.mark.parametrize("where", ["recover 1: 12/", "recover 2: 11/", "one-shot: perplexity",
                                   "[3/3]"])
def test_resume_continues_as_if_never_stopped(tmp_path, where):
    """Stopped mid-recovery (checkpoints after every chunk of 10 steps), right after a prune or
    in the final stage, a resumed run ends with the uninterrupted run's numbers."""
    whole = run_llm_recipe(config(tmp_path / "a"), log=lambda m: None)
    cfg = config(tmp_path / "b", checkpoint_minutes=1e-9)
    with pytest.raises(Stop):
        run_llm_recipe(cfg, log=stop_at(where))
    with pytest.raises(RecipeError, match="already holds a run"):
        run_llm_recipe(cfg, log=lambda m: None)
    resumed = run_llm_recipe(cfg, resume=True, log=lambda m: None)
    for a, b in zip(whole["points"], resumed["points"]):
        assert a["stage"] == b["stage"] and a["sparsity"] == b["sparsity"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)
    assert len(whole["points"]) == len(resumed["points"])
    assert [e["loss"] for e in whole["losses"]] == pytest.approx(
        [e["loss"] for e in resumed["losses"][-len(whole["losses"]):]], rel=1e-5)


def test_resume_refuses_another_config(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(Stop):
        run_llm_recipe(cfg, log=stop_at("[2/3]"))
    other = config(tmp_path / "x", prune__sparsity=0.7)
    import dataclasses
    other = dataclasses.replace(other, output_dir=cfg.output_dir)
    with pytest.raises(RecipeError, match="prune.sparsity"):
        run_llm_recipe(other, resume=True, log=lambda m: None)


def test_damaged_masks_are_refused(tmp_path):
    cfg = config(tmp_path, recover__steps=2, prune__steps=1)
    with pytest.raises(Stop):
        run_llm_recipe(cfg, log=stop_at("[3/3]"))
    from safetensors.torch import load_file, save_file

    record = json.loads((tmp_path / "run" / "record.json").read_text())
    path = tmp_path / "run" / record["student"] / "masks.safetensors"
    masks = load_file(str(path))
    name = next(iter(masks))
    masks[name] = masks[name][:, :-1].contiguous()
    save_file(masks, str(path))
    with pytest.raises(RecipeError, match="not a 0/1 tensor shaped like its weight"):
        run_llm_recipe(cfg, resume=True, log=lambda m: None)


def sweep_config(tmp_path, sparsities=(0.5,)):
    return config(tmp_path, prune__steps=1, recover__steps=4,
                  sweep={"pruners": ["magnitude", "sparsegpt"],
                         "granularities": ["fine", "2:4", "block"],
                         "sparsities": list(sparsities)})


def test_sweep_prunes_each_point_from_the_dense_weights(tmp_path):
    cfg = sweep_config(tmp_path)
    lines = []
    record = run_llm_recipe(cfg, log=lines.append)
    assert any(line.startswith("[4/4] one-shot sweep: 6 of 6") for line in lines)
    got = {(q["pruner"], q["granularity"]): q for q in record["sweep"]}
    assert set(got) == {(p, g) for p in ("magnitude", "sparsegpt") for g in ("fine", "2:4",
                                                                             "block")}
    for q in got.values():
        assert q["sparsity"] == 0.5 and q["measured_sparsity"] == pytest.approx(0.5, abs=1e-6)
        assert math.isfinite(q["perplexity"]) and q["vs_dense"] == pytest.approx(
            q["perplexity"] / record["dense"]["perplexity"])
    # a point is the dense model pruned once: redo one by hand
    recipe = LLMRecipe(cfg, resume=True, log=lambda m: None)
    recipe.teacher = transformers.AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path).eval()
    recipe._prepare_data(recipe.teacher.config.vocab_size)
    from sparsekernels.pruning import LevelPruner
    names = decoder_linears(recipe.teacher)
    pruner = LevelPruner(recipe.teacher, [{"op_names": names, "sparsity": 0.5,
                                           "granularity": "fine"}])
    pruner.compress()
    pruner.unwrap_model()
    assert recipe._perplexity(recipe.teacher) == pytest.approx(
        got[("magnitude", "fine")]["perplexity"], rel=1e-6)
    (speed,) = record["sweep_speed"]
    assert speed["sparsity"] == 0.5 and speed["pruner"] == "sparsegpt"
    assert speed["decode_x"] > 0 and speed["pruned_tok_s"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## One-shot perplexity per pruner and granularity" in report
    assert "## Tokens/s vs sparsity" in report
    assert report.count("| sparsegpt | 2:4 |") == 1


def test_sweep_resumes_and_extends(tmp_path):
    cfg = sweep_config(tmp_path)
    with pytest.raises(Stop):
        run_llm_recipe(cfg, log=stop_at("sparsegpt fine 0.5"))
    first = json.loads((tmp_path / "run" / "record.json").read_text())["sweep"]
    assert len(first) == 3
    lines = []
    import dataclasses
    wider = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep,
                                                               sparsities=(0.5, 0.25)))
    record = run_llm_recipe(wider, resume=True, log=lines.append)
    assert any("one-shot sweep: 7 of 10" in line for line in lines)
    assert record["sweep"][:3] == first
    assert len(record["sweep"]) == 10
    assert sorted(q["sparsity"] for q in record["sweep_speed"]) == [0.25, 0.5]


def test_distillation_loss_is_the_kl_of_next_token_distributions(tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama(tmp_path))).eval()
    ids = torch.randint(0, 256, (2, 9))
    assert distillation_loss(model, model, ids, 2.0, 0.5).item() == pytest.approx(0, abs=1e-6)
    other = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_llama(tmp_path / "o", seed=1))).eval()
    got = distillation_loss(other, model, ids, 2.0, 0.0)
    with torch.no_grad():
        p = F.softmax(model(input_ids=ids).logits.double() / 2, -1)
        q = F.softmax(other(input_ids=ids).logits.double() / 2, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * 4
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_schedules():
    assert step_targets(0.5, 1) == [0.5]
    assert step_targets(0.6, 3) == [0.2, 0.4, 0.6]
    assert recovery_shares(10, 3) == [3, 3, 4] and sum(recovery_shares(7, 2)) == 7


@pytest.mark.parametrize("data, message", [
    ({"prune": {"granularity": "2:4", "sparsity": 0.6}}, "keeps 2 of every 4"),
    ({"prune": {"granularity": "diagonal"}}, "prune.granularity"),
    ({"prune": {"pruner": "obs"}}, "prune.pruner"),
    ({"prune": {"block_size": [32, 7]}}, "prune.block_size"),
    ({"prune": {"steps": 3}, "recover": {"steps": 2}}, "cannot be shared by 3 prune steps"),
    ({"recover": {"stepz": 2}}, "recover: unknown key 'stepz'"),
    ({"data": {"source": "web"}}, "data.source"),
    ({"bench": {"new_tokens": 1}}, "bench.new_tokens"),
    ({"preset": "large"}, "unknown LLM preset"),
    ({"sweep": {"pruners": ["obs"]}}, "sweep.pruners"),
    ({"sweep": {"pruners": ["wanda"], "granularities": [124]}}, "sweep.granularities"),
    ({"sweep": {"pruners": ["wanda"], "sparsities": [0.5, 1.0]}}, "sweep.sparsities"),
    ({"sweep": {"pruners": ["wanda", "wanda"]}}, "lists a value twice"),
    ({"sweep": {"pruners": ["wanda"]}}, "sweep.speed"),
    ({"sweep": {"pruners": ["sparsegpt"], "granularities": ["fine"]}}, "sweep.speed"),
    ({"prune": {"reconstruct": -1}}, "prune.reconstruct"),
    ({"prune": {"reconstruct": True}}, "prune.reconstruct"),
    ({"prune": {"reconstruct": 2, "pruner": "magnitude"}}, "magnitude has none"),
])
def test_config_is_checked_before_anything_runs(data, message):
    with pytest.raises(RecipeConfigError, match=message):
        llm_from_dict({"recipe": "llm", **data})


def test_presets_and_files(tmp_path):
    demo, medium = llm_preset("demo"), llm_preset("medium")
    assert demo.prune.pruner == "sparsegpt" and demo.prune.granularity == "block"
    assert tuple(demo.prune.block_size) == (32, 32) and demo.prune.sparsity == 0.5
    assert medium.recover.steps > demo.recover.steps
    assert not demo.sweep.pruners and len(medium.sweep.cases()) == 21
    path = tmp_path / "llm.yaml"
    path.write_text("recipe: llm\npreset: medium\nrecover: {lr: 5e-5}\n")
    cfg = load_config(path)
    assert isinstance(cfg, LLMRecipeConfig) and cfg.recover.lr == 5e-5
    assert cfg.recover.steps == medium.recover.steps
    with pytest.raises(RecipeConfigError, match="--full"):
        load_config(path, full=True)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsekernels", *args], capture_output=True,
                          text=True)


def test_cli(tmp_path):
    cfg = config(tmp_path, recover__steps=2, prune__steps=1)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg.to_dict()))
    out = run_cli("prune", str(path))
    assert out.returncode == 0, out.stderr
    assert "done: perplexity" in out.stdout and (tmp_path / "run" / "report.md").exists()
    (tmp_path / "run" / "report.md").unlink()
    out = run_cli("report", str(tmp_path / "run"))
    assert out.returncode == 0 and (tmp_path / "run" / "report.md").exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "record.json").write_text(json.dumps({"config": {"recipe": "llm"},
                                                     "versions": {}}))
    out = run_cli("report", str(damaged))
    assert out.returncode == 2 and "cannot report" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("demo", "--llm", "--ffn")
    assert out.returncode == 2 and "two different demos" in out.stderr
    out = run_cli("prune", str(path))
    assert out.returncode == 2 and "already holds a run" in out.stderr


def test_text_without_a_tokenizer_is_refused_before_anything_runs(tmp_path):
    cfg = config(tmp_path, data={"source": "bbc"})
    with pytest.raises(RecipeError, match="no tokenizer loads from"):
        run_llm_recipe(cfg, log=lambda m: None)
    assert not (tmp_path / "run" / "record.json").exists()


def test_reconstruction_reaches_the_pruner_and_the_report(tmp_path, monkeypatch):
    """prune.reconstruct: the one-shot pruner trains each pruned layer (its log says so),
    the masks still hold through recovery, and the report names it."""
    from sparsekernels.pruning import SparseGPTPruner

    logs = []
    compress = SparseGPTPruner.compress

    def spy(self):
        out = compress(self)
        logs.append((self.reconstruct, list(self.reconstruction_log)))
        return out

    monkeypatch.setattr(SparseGPTPruner, "compress", spy)
    cfg = config(tmp_path, prune={"sparsity": 0.5, "steps": 1, "reconstruct": 2},
                 recover={"steps": 2, "batch_size": 2, "seq_len": 16})
    record = run_llm_recipe(cfg, log=lambda m: None)
    (spec, log), = logs
    assert spec.epochs == 2 and [i for i, _, _ in log] == [0, 1]
    assert all(after <= before for _, before, after in log)
    assert any(after < before for _, before, after in log)
    assert record["points"][1]["sparsity"] >= 0.5
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"reconstructed (2 epoch(s) of Adam at lr {spec.lr:g} " in report
    assert record["reconstruct_lr"] == spec.lr
