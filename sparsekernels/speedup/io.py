"""Save and load sped-up models (resized, kernel-mode or both) with safetensors.

A directory holds `model.safetensors` (the state dict, shared tensors once), `config.json`
for transformers models, and `sparsekernels.json`: the structure record (per-module shapes,
head counts, norms, SparseLinear layouts) that `load_model` replays on a freshly built
model before loading the weights. A resized transformers model saved with its own
`save_pretrained` loads the same way (its record travels in config.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from sparsekernels.speedup.model_speedup import STRUCTURE_ATTR
from sparsekernels.speedup.surgery import restore_structure

WEIGHTS = "model.safetensors"
RECORD = "sparsekernels.json"


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    structure = getattr(model, "_" + STRUCTURE_ATTR, {}) or {}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.architectures = [type(model).__name__]  # the class to rebuild, not the base's
        config.save_pretrained(path)
    tmp = path / (WEIGHTS + ".tmp")
    st_save_model(model, str(tmp))
    os.replace(tmp, path / WEIGHTS)  # atomic: a crash never leaves half a file under the name
    (path / RECORD).write_text(json.dumps({"structure": structure}, indent=1))
    return path


def load_model(path: str | os.PathLike, model: torch.nn.Module | None = None,
               model_class=None) -> torch.nn.Module:
    """Rebuild a sped-up model. For transformers models the class comes from config.json
    (or `model_class`); for other models pass a freshly built `model` of the original shape."""
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"{path / WEIGHTS} not found: save with sparsekernels.speedup."
                                "save_model(model, path) or model.save_pretrained(path)")
    structure = None
    if (path / RECORD).exists():
        structure = json.loads((path / RECORD).read_text())["structure"]
    if model is None:
        import transformers

        config = transformers.AutoConfig.from_pretrained(path)
        if structure is None:
            structure = getattr(config, STRUCTURE_ATTR, {}) or {}
        cls = model_class
        if cls is None:
            archs = getattr(config, "architectures", None) or []
            if not archs or not hasattr(transformers, archs[0]):
                raise ValueError(f"{path}/config.json names no known architecture; pass "
                                 "model_class=... (e.g. transformers.BertModel)")
            cls = getattr(transformers, archs[0])
        model = cls(config)
    restore_structure(model, structure or {})
    st_load_model(model, str(path / WEIGHTS), strict=False)
    missing = _missing_after_load(model, path / WEIGHTS)
    if missing:
        raise RuntimeError(f"{path / WEIGHTS} lacks {len(missing)} tensors of the rebuilt model, "
                           f"e.g. {missing[:3]}: was it saved from a different model?")
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    setattr(model, "_" + STRUCTURE_ATTR, structure or {})
    return model.eval()


def _missing_after_load(model: torch.nn.Module, weights: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        saved = set(f.keys())
    # a tensor shared with a saved one (tied embeddings) counts as present
    by_storage: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_storage.setdefault(id(t), name)
    seen_ids = {id(t) for n, t in model.state_dict(keep_vars=True).items() if n in saved}
    return [n for n, t in model.state_dict(keep_vars=True).items()
            if n not in saved and id(t) not in seen_ids]
