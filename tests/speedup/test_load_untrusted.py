"""load_model treats a saved directory as untrusted input: a kernel-mode directory with any
one damaged index tensor, a damaged record, tensors that do not match the rebuilt model, or
a config naming no concrete model class is refused with a clear CheckpointError, and a
refused load into a given model leaves that model exactly as it was."""

from __future__ import annotations

import builtins
import copy
import json
import random
import shutil

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from sparsekernels import SparseLinear
from sparsekernels.formats.block_sparse import INNER_NAMES
from sparsekernels.speedup import CheckpointError, ModelSpeedup, load_model, save_model
from sparsekernels.speedup.io import RECORD, WEIGHTS
from sparsekernels.speedup.surgery import restore_structure
from tests.formats.index_corruptions import damaged_index, damaged_values
from tests.speedup.families import block_masks, build, output_of


def snapshot(model):
    """What a refused load must not change: module types, state and structure record."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            copy.deepcopy(getattr(model, "_sparsekernels_structure", None)))


def assert_unchanged(model, before):
    types, state, record = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    assert all(state[k].dtype == before[1][k].dtype and torch.equal(state[k], before[1][k])
               for k in state)
    assert record == before[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(kernel-mode directory of a tiny BERT, a freshly built model of the same config,
    dummy input, the sped-up model's output)."""
    torch.manual_seed(0)
    model, dummy = build("bert")
    fresh = copy.deepcopy(model)
    masks = block_masks(model, (16, 16), 0.5)
    first = "bert.encoder.layer.0.intermediate.dense"
    masks[first]["weight"][:16] = 0  # an empty block row: repeated row pointers
    ModelSpeedup(model, dummy, masks, mode="kernel", block_size=(16, 16)).speedup_model()
    path = tmp_path_factory.mktemp("kernel") / "model"
    save_model(model, path)
    with torch.no_grad():
        expected = output_of(model, dummy)
    return path, fresh, dummy, expected


def sparse_layers(path):
    state = load_file(str(path / WEIGHTS))
    return sorted(k[: -len(".values")] for k in state if k.endswith(".values"))


def write_variant(src, dst, state=None, record=None, config=None):
    """A copy of directory `src` with the given weights / record text / config dict."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    if state is not None:
        save_file(state, str(dst / WEIGHTS))
    if record is not None:
        (dst / RECORD).write_text(record)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_undamaged_directory_loads_both_ways(saved):
    path, fresh, dummy, expected = saved
    for model in (None, copy.deepcopy(fresh)):
        loaded = load_model(path, model=model)
        assert any(isinstance(m, SparseLinear) for m in loaded.modules())
        with torch.no_grad():
            assert torch.equal(output_of(loaded, dummy), expected)


# --- the fuzz test: every index tensor, damaged in every way, is refused -------------------
@pytest.mark.parametrize("name", INNER_NAMES)
def test_fuzz_damaged_kernel_layout_is_refused(saved, tmp_path, name):
    path, fresh, _, _ = saved
    original = load_file(str(path / WEIGHTS))
    layers = sparse_layers(path)
    rng = random.Random(INNER_NAMES.index(name))
    given = copy.deepcopy(fresh)
    before = snapshot(given)
    # each tensor kind on 3 (index) or 4 (values) layers spread over the model
    chosen = layers[INNER_NAMES.index(name) % 4::4]
    count = 0
    variant = write_variant(path, tmp_path / "v")
    for layer in chosen:
        key = f"{layer}.{name}"
        cases = (damaged_values(original[key], in_memory=False) if name == "values"
                 else damaged_index(original[key], rng, contiguous_only=True))
        for label, bad in cases:
            save_file(dict(original, **{key: bad}), str(variant / WEIGHTS))
            into = given if count % 2 else None  # both paths: a fresh model and a given one
            count += 1
            try:
                with pytest.raises(CheckpointError) as info:
                    load_model(variant, model=into)
            except BaseException as e:
                raise AssertionError(f"{key} {label}: not refused ({e})") from e
            message = str(info.value)
            assert message.startswith(str(variant / WEIGHTS)), (label, message)
            assert layer in message, (label, message)
            assert "\n" not in message, (label, message)
    assert count >= 30
    assert_unchanged(given, before)


def test_missing_extra_and_tied_tensors_refused(saved, tmp_path):
    path, fresh, _, _ = saved
    original = load_file(str(path / WEIGHTS))
    missing = dict(original)
    del missing["bert.embeddings.LayerNorm.bias"]
    extra = dict(original, **{"bert.encoder.layer.9.output.dense.bias": torch.zeros(64)})
    for state, match in ((missing, r"lacks 1 tensors .*bert\.embeddings\.LayerNorm\.bias"),
                         (extra, r"no place for, e\.g\. \['bert\.encoder\.layer\.9")):
        variant = write_variant(path, tmp_path / "v", state=state)
        with pytest.raises(CheckpointError, match=match):
            load_model(variant)
        given = copy.deepcopy(fresh)
        before = snapshot(given)
        with pytest.raises(CheckpointError, match=match):
            load_model(variant, model=given)
        assert_unchanged(given, before)


@pytest.mark.parametrize("key, dtype", [("bert.embeddings.word_embeddings.weight", torch.float64),
                                        ("bert.encoder.layer.1.output.LayerNorm.bias", torch.float16),
                                        ("classifier.weight", torch.bfloat16)])
def test_dtype_not_recorded_for_the_model_is_refused(saved, tmp_path, key, dtype):
    path, fresh, _, _ = saved
    original = load_file(str(path / WEIGHTS))
    variant = write_variant(path, tmp_path / "v", state=dict(original, **{key: original[key].to(dtype)}))
    with pytest.raises(CheckpointError, match=rf"{key} is {dtype}, the model's is torch.float32"):
        load_model(variant)
    given = copy.deepcopy(fresh)
    before = snapshot(given)
    with pytest.raises(CheckpointError, match="does not cast"):
        load_model(variant, model=given)
    assert_unchanged(given, before)


@pytest.mark.parametrize("mode", [None, "kernel"])
def test_half_precision_model_comes_back_half(tmp_path, mode):
    model, dummy = build("bert")
    fresh = copy.deepcopy(model)
    if mode is not None:
        ModelSpeedup(model, dummy, block_masks(model, (16, 16), 0.5), mode=mode,
                     block_size=(16, 16)).speedup_model()
    model = model.half()
    save_model(model, tmp_path / "h")
    for into in (None, copy.deepcopy(fresh).half()):
        loaded = load_model(tmp_path / "h", model=into)
        assert all(p.dtype == torch.float16 for p in loaded.parameters())
        state = loaded.state_dict()
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    given = copy.deepcopy(fresh)
    before = snapshot(given)
    with pytest.raises(CheckpointError, match="is torch.float16, the model's is torch.float32"):
        load_model(tmp_path / "h", model=given)  # a given model is not converted
    assert_unchanged(given, before)


def test_two_layer_checkpoint_into_one_layer_model_refused(tmp_path):
    model, _ = build("bert")
    save_model(model, tmp_path / "two")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = 1
    one = tf.BertForSequenceClassification(cfg).eval()
    before = snapshot(one)
    with pytest.raises(CheckpointError, match=r"no place for.*layer\.1"):
        load_model(tmp_path / "two", model=one)
    assert_unchanged(one, before)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    variant = write_variant(tmp_path / "two", tmp_path / "v", config=dict(config, num_hidden_layers=1))
    with pytest.raises(CheckpointError, match=r"no place for.*layer\.1"):
        load_model(variant)


def test_shape_mismatch_refused(saved, tmp_path):
    path, _, _, _ = saved
    original = load_file(str(path / WEIGHTS))
    key = "bert.embeddings.word_embeddings.weight"
    variant = write_variant(path, tmp_path / "v", state=dict(original, **{key: original[key][:50].clone()}))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \[50, 64\], the rebuilt model's is \[96, 64\]"):
        load_model(variant)


def test_differing_tied_tensors_refused(tmp_path):
    model, _ = build("gpt2")  # lm_head.weight is transformer.wte.weight
    save_model(model, tmp_path / "g")
    state = load_file(str(tmp_path / "g" / WEIGHTS))
    names = ["lm_head.weight", "transformer.wte.weight"]
    kept = [n for n in names if n in state]
    assert len(kept) == 1  # saved once
    other = names[1 - names.index(kept[0])]
    state[other] = torch.randn_like(state[kept[0]])
    write_variant(tmp_path / "g", tmp_path / "v", state=state)
    with pytest.raises(CheckpointError, match="tied"):
        load_model(tmp_path / "v")
    assert load_model(tmp_path / "g") is not None


# --- config.json --------------------------------------------------------------------------
@pytest.mark.parametrize("archs, match", [
    (["PreTrainedModel"], "not a concrete transformers model class"),
    (["BertPreTrainedModel"], "not a concrete transformers model class"),
    (["AutoModel"], "not a concrete transformers model class"),
    (["GPT2Model"], "takes a GPT2Config"),
    (["NoSuchModel"], "names no known architecture"),
    ([], "names no known architecture"),
    ("BertModel", "names no known architecture"),
])
def test_config_must_name_a_concrete_model_class(saved, tmp_path, archs, match):
    path, _, _, _ = saved
    config = json.loads((path / "config.json").read_text())
    variant = write_variant(path, tmp_path / "v", config=dict(config, architectures=archs))
    with pytest.raises(CheckpointError, match=match):
        load_model(variant)


@pytest.mark.parametrize("model_type", ["bert", "not_a_transformers_type"])
def test_config_auto_map_never_runs_or_prompts_for_custom_code(saved, tmp_path, monkeypatch, model_type):
    path, _, dummy, expected = saved
    asked = []  # transformers asks through input() (and swallows what input raises)
    monkeypatch.setattr(builtins, "input", lambda *args, **kwargs: asked.append(args) or "n")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModel": "evil.EvilModel"})
    variant = write_variant(path, tmp_path / "v", config=config)
    (variant / "evil.py").write_text("raise SystemExit('custom code ran')\n")
    if model_type == "bert":  # the local class is used; the custom code is never imported
        with torch.no_grad():
            assert torch.equal(output_of(load_model(variant), dummy), expected)
    else:
        with pytest.raises(CheckpointError, match="config.json.*custom code"):
            load_model(variant)
    assert not asked, "load_model asked whether to run custom code"


# --- the record (sparsekernels.json) --------------------------------------------------------
def _record(path):
    return json.loads((path / RECORD).read_text())


def _bad_records(path):
    record = _record(path)
    structure = record["structure"]
    sparse = next(n for n, ch in structure.items() if ch and ch[0]["op"] == "sparse_linear")

    def with_change(**fields):
        changed = copy.deepcopy(structure)
        changed[sparse][0].update(fields)
        return json.dumps({"structure": changed})

    last = list(structure)[-1]
    return [
        ("not JSON", "{not json", "not valid JSON"),
        ("truncated", json.dumps(record)[:40], "not valid JSON"),
        ("a list", "[1, 2]", "must hold an object"),
        ("no structure", json.dumps({"structur": {}}), "no 'structure' entry"),
        ("structure a list", json.dumps({"structure": []}), "must be an object"),
        ("entry not a list", json.dumps({"structure": {sparse: {"op": "fuse_ffn"}}}), "must be a list"),
        ("change not an object", json.dumps({"structure": {sparse: ["sparse_linear"]}}), "must be an object"),
        ("unknown op", json.dumps({"structure": dict(structure, **{last: [{"op": "explode"}]})}),
         "unknown structure change 'explode'"),
        ("in_features a string", with_change(in_features="64"), "'in_features' must be a positive int"),
        ("bias a string", with_change(bias="yes"), "'bias' must be true or false"),
        ("block size of one", with_change(block_size=[16]), "'block_size' must be a list of two ints"),
        ("block size 8", with_change(block_size=[8, 8]), "not supported"),
        ("backend unknown", with_change(backend="gpu"), "unknown backend"),
        ("no such module", json.dumps({"structure": dict(structure, **{"bert.nope": [{"op": "fuse_ffn"}]})}),
         "no module 'bert.nope'"),
        ("attribute not allowed", json.dumps({"structure": dict(structure, **{
            "bert.pooler.dense": [{"op": "weight_layer", "weight": [64, 64], "bias": [64],
                                   "attrs": {"forward": 1}}]})}), "cannot set attribute 'forward'"),
        ("boolean as a count", json.dumps({"structure": dict(structure, **{
            "bert.embeddings.LayerNorm": [{"op": "norm", "size": True, "virtual": 64}]})}),
         "'size' must be a positive int"),
    ]


def test_damaged_record_is_a_one_line_error(saved, tmp_path):
    path, fresh, _, _ = saved
    given = copy.deepcopy(fresh)
    before = snapshot(given)
    for label, text, match in _bad_records(path):
        variant = write_variant(path, tmp_path / "v", record=text)
        for into in (None, given):
            with pytest.raises(CheckpointError) as info:
                load_model(variant, model=into)
            message = str(info.value)
            assert match in message, (label, message)
            assert RECORD in message and "\n" not in message, (label, message)
    assert_unchanged(given, before)


def test_restore_structure_checks_every_change_before_applying_any():
    model, _ = build("bert")
    before = snapshot(model)
    structure = {"bert.encoder.layer.0.output.dense": [
        {"op": "sparse_linear", "in_features": 128, "out_features": 64, "block_size": [16, 16],
         "bias": True}],
        "bert.encoder.layer.1.output.dense": [{"op": "sparse_linear", "in_features": 128}]}
    with pytest.raises(ValueError, match="'out_features' must be a positive int"):
        restore_structure(model, structure)
    assert_unchanged(model, before)


# --- paths ----------------------------------------------------------------------------------
def test_directory_and_file_mixups_are_named(saved, tmp_path):
    path, _, _, _ = saved
    with pytest.raises(NotADirectoryError, match="takes the directory"):
        load_model(path / WEIGHTS)
    variant = write_variant(path, tmp_path / "v")
    (variant / WEIGHTS).unlink()
    (variant / WEIGHTS).mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory; expected the safetensors"):
        load_model(variant)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nothing here")
    variant = write_variant(path, tmp_path / "v")
    (variant / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(variant)


def test_attention_implementation_comes_back_and_is_checked(tmp_path):
    """transformers does not save the attention implementation; a model rebuilt from its
    config would run SDPA where the saved one ran eager attention (another rounding)."""
    model, dummy = build("llama")  # eager attention
    ModelSpeedup(model, dummy, block_masks(model, (16, 16), 0.5), mode="kernel",
                 block_size=(16, 16)).speedup_model()
    path = save_model(model, tmp_path / "m")
    record = json.loads((path / RECORD).read_text())
    assert record["attn_implementation"] == model.config._attn_implementation
    loaded = load_model(path)
    assert loaded.config._attn_implementation == model.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(output_of(loaded, dummy), output_of(model, dummy))
    record["attn_implementation"] = "remote_code_attention"
    variant = write_variant(path, tmp_path / "v", record=json.dumps(record))
    with pytest.raises(CheckpointError, match="attn_implementation 'remote_code_attention'"):
        load_model(variant)
