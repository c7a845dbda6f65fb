"""The image task (ImageFolder layout) and the recipe on a ViT: loading, batching against a
float64 reference, errors, and the recipe end to end on a tiny random ViT."""

import json

import numpy as np
import pytest
import torch

from sparsekernels.recipes.config import from_dict
from sparsekernels.recipes.images import ImageExample, make_image_batches
from sparsekernels.recipes.tasks import TaskConfig, TaskError, load_task

PIL = pytest.importorskip("PIL.Image")
SIZE = 16
CLASSES = ("blue", "green", "red")  # sorted: label ids 0, 1, 2


def _image(rng, channel):
    pixels = rng.integers(0, 90, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., channel] += 150  # the class is the dominant channel: learnable in a few steps
    return pixels


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label, channel in zip(CLASSES, (2, 1, 0)):
        (root / label).mkdir(parents=True)
        for i in range(12):
            PIL.fromarray(_image(rng, channel)).save(root / label / f"{i}.png")
    return root


@pytest.fixture
def vit_dir(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=SIZE, patch_size=4, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=5)
    path = tmp_path / "vit"
    ViTForImageClassification(config).save_pretrained(path)  # a head of 5: replaced by 3
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


def test_image_folder_labels_and_stratified_split(folder):
    data = load_task(TaskConfig(name="images", image_dir=str(folder), eval_fraction=0.25))
    assert data.labels == list(CLASSES) and data.modality == "image"
    assert len(data.train) == 27 and len(data.eval) == 9
    assert sorted(e.label for e in data.eval) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    paths = {e.path for e in data.train} | {e.path for e in data.eval}
    assert len(paths) == 36
    for e in data.train + data.eval:
        assert f"/{CLASSES[e.label]}/" in e.path
    again = load_task(TaskConfig(name="images", image_dir=str(folder), eval_fraction=0.25))
    assert again.eval == data.eval  # deterministic


def test_separate_eval_folder_shares_the_label_ids(folder, tmp_path):
    evals = tmp_path / "eval"
    (evals / "red").mkdir(parents=True)
    PIL.fromarray(_image(np.random.default_rng(1), 0)).save(evals / "red" / "x.png")
    data = load_task(TaskConfig(name="images", image_dir=str(folder), eval_image_dir=str(evals)))
    assert len(data.train) == 36 and [e.label for e in data.eval] == [2]
    (evals / "purple").mkdir()
    PIL.fromarray(_image(np.random.default_rng(1), 0)).save(evals / "purple" / "x.png")
    with pytest.raises(TaskError, match="purple"):
        load_task(TaskConfig(name="images", image_dir=str(folder), eval_image_dir=str(evals)))


@pytest.mark.parametrize("bad, error, match", [
    (dict(name="images"), TaskError, "needs image_dir"),
    (dict(name="csv", train_file="x.csv", image_dir="d"), TaskError, "only read by the images"),
])
def test_bad_image_configs(bad, error, match):
    with pytest.raises(error, match=match):
        TaskConfig(**bad)


def test_bad_image_folders(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_task(TaskConfig(name="images", image_dir=str(tmp_path / "missing")))
    (tmp_path / "flat").mkdir()
    with pytest.raises(TaskError, match="no class folders"):
        load_task(TaskConfig(name="images", image_dir=str(tmp_path / "flat")))
    (folder / "empty").mkdir()
    with pytest.raises(TaskError, match="holds no images"):
        load_task(TaskConfig(name="images", image_dir=str(folder)))


def test_image_batches_match_a_float64_reference(folder):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE})  # mean = std = 0.5
    examples = [ImageExample(str(folder / c / f"{i}.png"), k)
                for k, c in enumerate(CLASSES) for i in range(3)]
    batches = make_image_batches(examples, processor, batch_size=4)
    assert [len(b["labels"]) for b in batches] == [4, 4, 1]
    pixels = torch.cat([b["pixel_values"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert pixels.shape == (9, 3, SIZE, SIZE) and labels.tolist() == [e.label for e in examples]
    for got, e in zip(pixels, examples):
        raw = torch.from_numpy(np.array(PIL.open(e.path).convert("RGB"))).double()
        want = (raw / 255 - 0.5) / 0.5
        torch.testing.assert_close(got.double(), want.permute(2, 0, 1), rtol=0, atol=1e-6)
    shuffled = make_image_batches(examples, processor, batch_size=4, shuffle=True, seed=3)
    assert sorted(torch.cat([b["labels"] for b in shuffled]).tolist()) == sorted(labels.tolist())


def test_unreadable_image_is_named(folder):
    from transformers import ViTImageProcessor

    bad = folder / "red" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(TaskError, match="broken.png"):
        make_image_batches([ImageExample(str(bad), 0)],
                           ViTImageProcessor(size={"height": SIZE, "width": SIZE}), 2)


def test_recipe_on_a_vit_image_task(folder, vit_dir, tmp_path):
    from sparsekernels.recipes.transformer import TransformerRecipe
    from sparsekernels.speedup.io import load_model

    config = from_dict({
        "model": {"name_or_path": str(vit_dir)},
        "task": {"name": "images", "image_dir": str(folder), "eval_fraction": 0.25},
        "finetune": {"epochs": 2, "batch_size": 9, "lr": 1e-3},
        "attention": {"steps": 6, "sparsity": 0.5},
        "distill": {"steps": 16},
        "ffn": {"sparsity": 0.5, "times": 1, "taylor_steps": 3},
        "hidden": {"sparsity": 0.25, "times": 1, "taylor_steps": 3},
        "bench": {"reps": 1, "batch_size": 2, "kernel_sparsities": [0.5]},
        "output_dir": str(tmp_path / "run")})
    record = TransformerRecipe(config, log=lambda *_: None).run()
    assert record["stages_done"] == ["finetune", "attention", "distill", "final"]
    stages = [p["stage"] for p in record["points"]]
    assert {"finetuned", "attention", "ffn-1", "hidden-1", "final"} <= set(stages)
    sparsities = [p["sparsity"] for p in record["points"]]
    assert sparsities == sorted(sparsities) and sparsities[-1] > 0.3
    assert record["bench_inputs"]["seq_len"] is None
    run = tmp_path / "run"
    assert (run / "report.md").exists() and (run / "latency.csv").exists()
    saved = json.loads((run / "record.json").read_text())
    model = load_model(run / saved["final_model"]).eval()
    logits = model(pixel_values=torch.randn(2, 3, SIZE, SIZE)).logits
    assert logits.shape == (2, 3)
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(run / saved["final_model"])
    image = PIL.open(folder / "red" / "0.png")
    assert model(**processor(images=[image], return_tensors="pt")).logits.shape == (1, 3)
    # a quarter of the 64 hidden channels went, from every layer on the residual stream
    assert model.vit.embeddings.cls_token.shape[-1] == 48
    assert model.vit.embeddings.patch_embeddings.projection.out_channels == 48
    assert model.vit.layernorm.weight.shape == (48,)
