"""Image-classification tasks for the pruning recipe (ViT and other image encoders).

    train, evals, labels = load_image_folder(cfg)        # cfg.name == "images"
    batches = make_image_batches(train, processor, batch_size=32, shuffle=True)

The layout is torchvision's ImageFolder: `<image_dir>/<label>/<any name>.<png|jpg|...>`,
one folder per class; the label names are the folder names in sorted order. Without
`eval_image_dir`, `eval_fraction` of the images is split off, stratified, as for text tasks.
Images are decoded and preprocessed once, by the model's image processor (resize,
rescale, normalise), into float pixel_values: memory is 4 * C * H * W bytes per image
(600 KB at 224 x 224), so a large set needs max_train / max_eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageExample:
    path: str
    label: int


def _folder_examples(directory: Path, labels: list[str] | None, key: str) -> tuple[list, list[str]]:
    from sparsekernels.recipes.tasks import TaskError

    if not directory.is_dir():
        raise FileNotFoundError(f"task.{key}: {directory} is not a directory (expected one "
                                "folder per class, holding that class's images)")
    found = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise TaskError(f"task.{key}: {directory} has no class folders; lay the images out as "
                        f"{directory}/<label>/<image>")
    if labels is None:
        labels = found
    elif set(found) - set(labels):
        raise TaskError(f"task.{key}: {directory} has classes the training images lack: "
                        f"{sorted(set(found) - set(labels))}")
    examples = []
    for label in found:
        files = sorted(p for p in (directory / label).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise TaskError(f"task.{key}: {directory / label} holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        examples += [ImageExample(str(f), labels.index(label)) for f in files]
    return examples, labels


def load_image_folder(cfg) -> tuple[list[ImageExample], list[ImageExample], list[str]]:
    """Train and eval examples and the label names of an `images` TaskConfig."""
    from sparsekernels.recipes.tasks import _split

    train, labels = _folder_examples(Path(cfg.image_dir), None, "image_dir")
    if cfg.eval_image_dir:
        evals, _ = _folder_examples(Path(cfg.eval_image_dir), labels, "eval_image_dir")
    else:
        train, evals = _split(train, cfg.eval_fraction, cfg.seed)
    return train, evals, labels


def load_image_processor(path: str, model_config):
    """The model directory's image processor; without one (a model saved without
    preprocessor_config.json), a ViT processor at the model's image size, mean/std 0.5."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        size = getattr(model_config, "image_size", 224)
        return ViTImageProcessor(size={"height": size, "width": size})


def make_image_batches(examples: Sequence[ImageExample], processor, batch_size: int,
                       shuffle: bool = False, seed: int = 0) -> list[dict]:
    """Batches of pixel_values and labels, in the order make_batches uses for text."""
    import torch

    from sparsekernels.recipes.tasks import TaskError, batch_chunks

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise TaskError("image tasks need Pillow: pip install pillow") from None
    batches = []
    for chunk in batch_chunks(examples, batch_size, shuffle, seed):
        images = []
        for e in chunk:
            try:
                with Image.open(e.path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                raise TaskError(f"cannot read image {e.path}: {exc}; remove or replace it") from None
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        batches.append({"pixel_values": pixels,
                        "labels": torch.tensor([e.label for e in chunk], dtype=torch.long)})
    return batches
