"""Save and load sped-up models (resized, kernel-mode or both) with safetensors.

A directory holds `model.safetensors` (the state dict, shared tensors once), `config.json`
for transformers models, and `sparsekernels.json`: the structure record (per-module shapes,
head counts, norms, SparseLinear layouts) that `load_model` replays on a freshly built
model before loading the weights. A resized transformers model saved with its own
`save_pretrained` loads the same way (its record travels in config.json).

Loading treats the directory as untrusted: the record is checked before it is replayed, and
the weights must match the rebuilt model exactly (every tensor used, every parameter and
persistent buffer filled, dtypes and shapes as the model has them, block-sparse indices
valid), else a CheckpointError says what is wrong. Into a given model, all of that is
checked on a weightless copy first, so a refusal leaves the model as it was.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path

import torch
from torch import nn

from sparsekernels.formats.block_sparse import INDEX_NAMES, InvalidIndexError, validate_index
from sparsekernels.speedup.model_speedup import STRUCTURE_ATTR
from sparsekernels.speedup.surgery import restore_structure

WEIGHTS = "model.safetensors"
RECORD = "sparsekernels.json"


class CheckpointError(ValueError):
    """A saved directory that cannot be loaded as it is (damaged, or not this model's)."""


# attention implementations a saved model may name (transformers' own, and ours)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2",
                        "flash_attention_3", "sparsekernels")


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    from safetensors.torch import save_model as st_save_model

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
    record = {"structure": structure}
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if isinstance(impl, str) and impl in ATTN_IMPLEMENTATIONS:
        # transformers does not save it, and a model rebuilt from config.json gets its default
        # (sdpa), which rounds differently from the eager attention the model ran
        record["attn_implementation"] = impl
    (path / RECORD).write_text(json.dumps(record, indent=1))
    return path


def load_model(path: str | os.PathLike, model: torch.nn.Module | None = None,
               model_class=None) -> torch.nn.Module:
    """Rebuild a sped-up model. For transformers models the class comes from config.json
    (or `model_class`); for other models pass a freshly built `model` of the original shape
    (it is changed in place only once the whole directory has been checked against it)."""
    path = Path(path)
    weights = _weights_file(path)
    structure, source, attn_implementation = _read_record(path)
    state = _read_weights(weights)
    if model is None:
        model, structure, source = _build(path, model_class, structure, source,
                                          attn_implementation)
        _replay(model, structure, source)
        _adopt_file_dtype(model, state)
        full = _match(model, state, weights)
    else:  # every refusal happens on the copy, before `model` changes
        shadow = _weightless_copy(model)
        _replay(shadow, structure, source)
        full = _match(shadow, state, weights)
        _replay(model, structure, source)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as e:  # checked above; kept so a miss is never silent
        raise CheckpointError(f"{weights}: {e}") from None
    setattr(model, "_" + STRUCTURE_ATTR, structure or {})
    return model.eval()


# --- the directory ----------------------------------------------------------------------------
def _weights_file(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the directory written by "
                                "sparsekernels.speedup.save_model(model, path)")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file: load_model takes the directory that "
                                 f"save_model wrote (the one holding {WEIGHTS}), e.g. {path.parent}")
    weights = path / WEIGHTS
    if weights.is_dir():
        raise IsADirectoryError(f"{weights} is a directory; expected the safetensors weights "
                                "file that save_model (or save_pretrained) writes")
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found: save with sparsekernels.speedup."
                                "save_model(model, path) or model.save_pretrained(path)")
    return weights


def _read_record(path: Path) -> tuple[dict | None, str, str | None]:
    """(the structure record of sparsekernels.json, its source, the attention implementation
    it names); None for what the file lacks (all of it when the file is absent)."""
    record_path = path / RECORD
    if not record_path.exists():
        return None, str(record_path), None
    if record_path.is_dir():
        raise CheckpointError(f"{record_path} is a directory; expected the JSON record that "
                              "save_model writes")
    try:
        record = json.loads(record_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{record_path} is not valid JSON ({e}): the file is damaged; "
                              "save the model again") from None
    if not isinstance(record, dict) or "structure" not in record:
        got = "no 'structure' entry" if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f'{record_path} must hold an object {{"structure": {{...}}}}, got '
                              f"{got}: the file is damaged or not sparsekernels' record")
    impl = record.get("attn_implementation")
    if impl is not None and impl not in ATTN_IMPLEMENTATIONS:
        raise CheckpointError(f"{record_path}: attn_implementation {impl!r} is not one of "
                              f"{', '.join(ATTN_IMPLEMENTATIONS)}: the file is damaged")
    return record["structure"], str(record_path), impl


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None


def _build(path: Path, model_class, structure, source: str, attn_implementation: str | None):
    """A fresh model from config.json, with the record (sparsekernels.json, else config's)."""
    import transformers

    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: for a model that is not a "
                                "transformers model, pass a freshly built one as model=...")
    try:
        # never run code named by the directory (auto_map): a checkpoint is data
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "custom code" in first:
            first += (" (load_model never runs code named by a checkpoint: build the model "
                      "yourself and pass it as model=...)")
        raise CheckpointError(f"cannot read {config_path}: {first}") from None
    if structure is None:
        structure = getattr(config, STRUCTURE_ATTR, None) or {}
        source = f"{config_path} ({STRUCTURE_ATTR})"
    cls = _model_class(config, model_class, config_path)
    if attn_implementation not in (None, "sparsekernels"):  # ours comes back with the record
        config._attn_implementation = attn_implementation
    return cls(config), structure, source


def _model_class(config, model_class, config_path: Path) -> type:
    import transformers

    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        name = archs[0] if isinstance(archs, list) and archs else None
        if not isinstance(name, str) or not hasattr(transformers, name):
            raise CheckpointError(f"{config_path} names no known architecture ({archs!r}); pass "
                                  "model_class=... (e.g. transformers.BertModel)")
        model_class, named = getattr(transformers, name), f"architectures names {name}"
    else:
        named = f"model_class={getattr(model_class, '__name__', model_class)!r}"
    base = transformers.PreTrainedModel
    if (not isinstance(model_class, type) or not issubclass(model_class, base)
            or model_class.__name__.endswith("PreTrainedModel")):
        raise CheckpointError(f"{config_path}: {named}, which is not a concrete transformers "
                              "model class; pass model_class=... (e.g. transformers.BertModel)")
    wanted = getattr(model_class, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        raise CheckpointError(f"{config_path}: {named}, which takes a {wanted.__name__}, but the "
                              f"config is a {type(config).__name__}")
    return model_class


def _adopt_file_dtype(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A model we built takes the floating dtype the file holds, when it holds one (a saved
    half-precision model comes back half); a mix is checked tensor by tensor later."""
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    ours = {t.dtype for t in itertools.chain(model.parameters(), model.buffers())
            if t.is_floating_point()}
    if len(floats) == 1 and len(ours) == 1 and floats != ours:
        model.to(next(iter(floats)))


# --- checking and loading -------------------------------------------------------------------
def _weightless_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are meta tensors (shapes and dtypes, no
    storage): what restoring the record does to `model`, without touching or doubling it."""
    memo: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if type(t) in (torch.Tensor, nn.Parameter) and id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = (nn.Parameter(empty, requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else empty)
    return copy.deepcopy(model, memo)


def _replay(model: nn.Module, structure, source: str) -> None:
    """Give `model` the recorded structure (checked before anything changes)."""
    try:
        restore_structure(model, {} if structure is None else structure)
    except ValueError as e:  # validate_structure's refusals, before any change
        raise CheckpointError(f"{source}: {e}") from None
    except (KeyError, IndexError, RuntimeError, TypeError) as e:  # well formed, but not this model's
        raise CheckpointError(f"{source}: the record does not fit {type(model).__name__}: "
                              f"{type(e).__name__}: {e}") from e
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def _match(model: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> dict:
    """Check the file's tensors against `model` (restored); returns the state dict to load:
    the file's tensors, under every name a tied tensor has."""
    from sparsekernels.nn.quantized_sparse_linear import QuantizedSparseLinear
    from sparsekernels.nn.sparse_linear import SparseLinear

    expected = model.state_dict(keep_vars=True)  # parameters and persistent buffers
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights} holds {len(unexpected)} tensors the rebuilt model has "
                              f"no place for, e.g. {unexpected[:3]}: was it saved from a "
                              "different model (or with a different structure record)?")
    tied: dict[int, list[str]] = {}  # one tensor under several names: saved under one
    for name, t in expected.items():
        tied.setdefault(id(t), []).append(name)
    full = dict(state)
    missing = []
    for names in tied.values():
        present = [n for n in names if n in state]
        if not present:
            missing.append(names[0])
            continue
        for other in present[1:]:
            if (state[other].shape != state[present[0]].shape
                    or not torch.equal(state[other], state[present[0]])):
                raise CheckpointError(f"{weights}: {other} and {present[0]} are one tensor in the "
                                      "rebuilt model (tied) but differ in the file")
        for n in names:
            full.setdefault(n, state[present[0]])
    if missing:
        raise CheckpointError(f"{weights} lacks {len(missing)} tensors of the rebuilt model, "
                              f"e.g. {missing[:3]}: was it saved from a different model?")
    # block-sparse layers take their layout (number of stored blocks) from the file
    sparse = {name: m for name, m in model.named_modules()
              if isinstance(m, (SparseLinear, QuantizedSparseLinear))}
    free_shape = {f"{p}.{n}" if p else n for p in sparse for n in ("values",) + INDEX_NAMES}
    for name, t in state.items():
        want = expected[name]
        if t.dtype != want.dtype:
            raise CheckpointError(
                f"{weights}: {name} is {t.dtype}, the model's is {want.dtype}; load_model does "
                "not cast (convert the model with .to(dtype) first, or save it in that dtype)")
        if name not in free_shape and tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{weights}: {name} has shape {list(t.shape)}, the rebuilt "
                                  f"model's is {list(want.shape)}: was it saved from a "
                                  "different model (or with a different structure record)?")
    for prefix, module in sparse.items():  # layouts come from the file: check them once
        key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        values = state[key("values")]
        if tuple(values.shape[1:]) != tuple(module.block_size):
            raise CheckpointError(f"{weights}: {key('values')} has blocks of "
                                  f"{list(values.shape[1:])}, the record says {module.block_size}")
        try:
            blocks = values if values.is_floating_point() else values.to(torch.float32)  # int8
            validate_index(blocks, {n: state[key(n)] for n in INDEX_NAMES},
                           (module.out_features, module.in_features), prefix or "SparseLinear")
        except InvalidIndexError as e:
            raise CheckpointError(f"{weights}: {e}") from None
    return full
