"""The run report: report.md with its tables, points.csv, latency.csv and four PNG plots.

    path = write_report(run_dir, record)     # run_dir/report.md
    record = load_record(run_dir)            # run_dir/record.json

`record` is a JSON-able dict (every field optional except config and versions; tensor and
numpy scalars are unwrapped, other non-JSON values written as strings):
  config, versions, seed
  dense     {"accuracy": float, "params": {component: int}}
  points    [{"stage", "step", "sparsity", "accuracy"}]       accuracy vs encoder sparsity
  latency   [{"variant": dense|masked|kernel|resize|auto (+ " int8" / " bfloat16"), "sparsity", "ms"}]
  per_layer {"before": {name: ms}, "after": {name: ms}}
  params    {"before": {component: int}, "after": {component: int}}
  final     {"accuracy", "sparsity", "speedup", ..., and in another dtype: "dtype",
             "float32_accuracy" (the same model in float32)}
write_report also writes record.json, so load_record(run_dir) gives the record back. Every
file is written to a temporary name in run_dir and moved into place (os.replace), so a
reader never sees half a file; a plot without data is not drawn (and an old one removed),
and report.md says why.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from sparsekernels.recipes.config import KEEP_BEST_AT, best_band, best_rank

RECORD_FILE = "record.json"
REPORT_FILE = "report.md"
POINTS_CSV = "points.csv"
LATENCY_CSV = "latency.csv"
PLOTS = {
    "accuracy": "accuracy_vs_sparsity.png",
    "latency": "latency_vs_sparsity.png",
    "per_layer": "per_layer_time.png",
    "params": "params_by_component.png",
}
COMPONENT_ORDER = ("embedding", "attention", "ffn", "other")
VARIANT_ORDER = ("dense", "masked", "kernel", "resize", "auto")
# one colour per kind of state, the same in every report (matplotlib's tab10 order)
STATE_COLOURS = {"finetuned": "C0", "attention": "C1", "ffn": "C2", "recovered": "C3",
                 "hidden": "C4", "distilled": "C5", "final": "C6"}
POINT_FIELDS = ["stage", "step", "sparsity", "accuracy"]
LATENCY_FIELDS = ["variant", "sparsity", "ms"]


# -- files ----------------------------------------------------------------------------------
def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_record(run_dir: str | os.PathLike) -> dict:
    """The record a run saved in run_dir/record.json."""
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory "
                                f"(write_report writes record.json)?")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): it was edited or cut short; "
                         "restore it from the run (the recipe writes it atomically)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {type(record).__name__}, not a record object")
    return record


def _plain(value: Any) -> Any:
    """JSON's default= hook: tensor / numpy scalars become numbers, anything else a string."""
    if callable(getattr(value, "item", None)) and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _checked_record(record: Any) -> dict:
    """A plain-JSON copy of record (scalars unwrapped, paths as strings), checked."""
    if not isinstance(record, dict):
        raise TypeError(f"record must be a dict, got {type(record).__name__}")
    missing = [k for k in ("config", "versions") if k not in record]
    if missing:
        raise ValueError(f"record lacks {missing}: every report says what was run and with "
                         f"which versions")
    record = json.loads(json.dumps(record, default=_plain))
    for key, fields in (("points", POINT_FIELDS), ("latency", LATENCY_FIELDS)):
        rows = record.get(key) or []
        if not isinstance(rows, list):
            raise TypeError(f"record[{key!r}] must be a list of dicts, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            lacks = [f for f in fields if not isinstance(row, dict) or f not in row]
            if lacks:
                raise ValueError(f"record[{key!r}][{i}] lacks {lacks}; each entry needs "
                                 f"{fields}")
    return record


# -- formatting -----------------------------------------------------------------------------
def _num(value: Any, fmt: str = "{:.4f}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else fmt.format(value)
    return str(value)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    extra = sorted({k for r in rows for k in r} - set(fields))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields + extra, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in fields + extra})
    return buf.getvalue()


# -- the numbers behind the headline ----------------------------------------------------------
def _total(params: dict | None) -> int | None:
    return sum(int(v) for v in params.values()) if params else None


def _encoder(params: dict | None) -> int | None:
    return int(params.get("attention", 0)) + int(params.get("ffn", 0)) if params else None


def _dense_ms(latency: list[dict]) -> float | None:
    dense = [r for r in latency if r["variant"] == "dense"]
    return min(dense, key=lambda r: r["sparsity"])["ms"] if dense else None


def _final_latency(final: dict, latency: list[dict],
                   dense_ms: float | None) -> tuple[float | None, str]:
    """The final model's latency and where it came from: final.ms, else the latency row of
    final.variant nearest final.sparsity, else dense / final.speedup, else the fastest row
    nearest final.sparsity."""
    if final.get("ms") is not None:
        variant = final.get("variant")
        return float(final["ms"]), ("measured on the final model"
                                    + (f" ({variant} mode)" if variant else ""))
    rows = [r for r in latency if r["variant"] != "dense"]
    if final.get("variant"):
        rows = [r for r in rows if r["variant"] == final["variant"]]
    elif final.get("speedup") and dense_ms:
        return dense_ms / float(final["speedup"]), "dense latency / final.speedup"
    if not rows:
        return None, ""
    top = max(r["sparsity"] for r in rows)
    if final.get("sparsity") is not None:
        target = float(final["sparsity"])
        top = min({r["sparsity"] for r in rows}, key=lambda s: abs(s - target))
    best = min((r for r in rows if r["sparsity"] == top), key=lambda r: r["ms"])
    return float(best["ms"]), f"fastest {best['variant']} at sparsity {best['sparsity']:.3f}"


def _headline(record: dict) -> str:
    dense, final = record.get("dense") or {}, record.get("final") or {}
    params = record.get("params") or {}
    before = params.get("before") or dense.get("params")
    after = params.get("after")
    latency = record.get("latency") or []
    dense_ms = final.get("dense_ms", _dense_ms(latency))
    final_ms, source = _final_latency(final, latency, dense_ms)
    speedup = final.get("speedup")
    if speedup is None and dense_ms and final_ms:
        speedup = dense_ms / final_ms
    acc_d, acc_f = dense.get("accuracy"), final.get("accuracy")
    rows = [
        ["accuracy", _num(acc_d), _num(acc_f),
         _num(acc_f - acc_d, "{:+.4f}") if acc_d is not None and acc_f is not None else "n/a"],
        ["encoder sparsity", _pct(0.0), _pct(final.get("sparsity")), ""],
        ["parameters", _num(_total(before)), _num(_total(after)),
         _ratio(_total(before), _total(after))],
        ["attention + FFN parameters", _num(_encoder(before)), _num(_encoder(after)),
         _ratio(_encoder(before), _encoder(after))],
        ["latency (ms)", _num(dense_ms, "{:.3f}"), _num(final_ms, "{:.3f}"),
         f"speedup x{speedup:.2f}" if speedup else "n/a"],
    ]
    if final.get("float32_accuracy") is not None:  # the final model runs in another dtype
        dtype, acc32 = final.get("dtype", "?"), final["float32_accuracy"]
        rows[0][0] = f"accuracy (final in {dtype})"
        rows.insert(1, ["accuracy, the final model in float32", "", _num(acc32),
                        _num(acc_f - acc32, f"{dtype} {{:+.4f}}") if acc_f is not None else "n/a"])
    text = _table(["", "dense", "final", "change"], rows)
    if source:
        text += f"\n\nFinal latency: {source}."
    return text


def _ratio(a: int | None, b: int | None) -> str:
    return f"{100 * b / a:.1f}% kept" if a and b is not None else "n/a"


# -- plots ----------------------------------------------------------------------------------
def _figure(width=6.4, height=4.2):
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> None:
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def _targets(record: dict) -> list[str]:
    """For each target sparsity (the run's keep_best_at), the most accurate model state the
    run measured at that sparsity or more (after a prune, recovered before the next one, or
    final), and the checkpoint that holds it when the run kept it."""
    dense = (record.get("dense") or {}).get("accuracy")
    pruned = [p for p in record.get("points") or [] if p.get("sparsity", 0) > 0]
    if dense is None or not pruned:
        return []
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    kept = record.get("best") or {}
    rows = []
    for target in config.get("keep_best_at") or KEEP_BEST_AT:
        hits = [p for p in pruned if p["sparsity"] >= target]
        if not hits:
            rows.append([f">= {target:.0%}", "not reached", "", "", "", ""])
            continue
        best = max(hits, key=best_rank)
        saved = kept.get(best_band(target)) or {}
        same = all(saved.get(k) == best[k] for k in ("stage", "step", "sparsity", "accuracy"))
        rows.append([f">= {target:.0%}", f"{best['stage']} @ step {best['step']}",
                     _pct(best["sparsity"]), _num(best["accuracy"]),
                     _num(best["accuracy"] - dense, "{:+.4f}"),
                     f"`{saved['checkpoint']}`" if same and "checkpoint" in saved else "not kept"])
    return ["Best measured state at each target sparsity:", "",
            _table(["encoder sparsity", "state", "sparsity", "accuracy", "vs dense", "model"],
                   rows), ""]


def _plot_accuracy(record: dict, path: Path) -> None:
    fig, ax = _figure()
    points = record["points"]
    # ffn-1, ffn-2, ... are one series: the state right after each FFN prune
    series = lambda p: re.sub(r"-\d+$", "", p["stage"])  # noqa: E731
    # one line in run order (the path the model took: prune, recover, prune, ...),
    # markers coloured by kind of state; joining same-kind points would draw a path
    # the run never took
    ax.plot([100 * p["sparsity"] for p in points], [p["accuracy"] for p in points], "-",
            color="lightgrey", linewidth=1, zorder=1)
    for stage in dict.fromkeys(series(p) for p in points):
        if stage == "final" and (record.get("final") or {}).get("accuracy") is not None:
            continue  # drawn below as the star
        pts = [p for p in points if series(p) == stage]
        ax.plot([100 * p["sparsity"] for p in pts], [p["accuracy"] for p in pts], "o",
                label=stage, markersize=4, zorder=2, color=STATE_COLOURS.get(stage))
    dense_acc = (record.get("dense") or {}).get("accuracy")
    if dense_acc is not None:
        ax.axhline(dense_acc, color="grey", linestyle="--", label=f"dense ({dense_acc:.3f})")
    final = record.get("final") or {}
    if final.get("accuracy") is not None and final.get("sparsity") is not None:
        ax.plot([100 * final["sparsity"]], [final["accuracy"]], "*", color="black",
                markersize=12, label="final")
    ax.set_xlim(left=0)
    ax.set_xlabel("encoder sparsity (%)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs encoder sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_latency(record: dict, path: Path) -> None:
    fig, ax = _figure()
    rows = record["latency"]
    variants = sorted({r["variant"] for r in rows},
                      key=lambda v: (VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99, v))
    for v in variants:
        pts = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["sparsity"])
        xs, ys = [100 * r["sparsity"] for r in pts], [r["ms"] for r in pts]
        if v == "dense" and len(pts) == 1:
            ax.axhline(ys[0], color="grey", linestyle="--", label=f"dense ({ys[0]:.2f} ms)")
        else:
            ax.plot(xs, ys, "o-", label=v, markersize=4)
    ax.set_xlim(left=0)
    ax.set_xlabel("encoder sparsity (%)")
    ax.set_ylabel("latency (ms, median)")
    ax.set_ylim(bottom=0)
    ax.set_title("Latency vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _grouped_bars(path: Path, title: str, xlabel: str, labels: list[str],
                  series: dict[str, list[float]]) -> None:
    fig, ax = _figure(width=max(6.4, 0.5 * len(labels) + 2), height=4.2)
    n = len(series)
    width = 0.8 / max(n, 1)
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, values, width=width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 6 else 0,
                  ha="right" if len(labels) > 6 else "center", fontsize=8)
    ax.set_ylabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(fig, path)


def _per_layer(record: dict) -> tuple[list[str], dict[str, dict]]:
    per = record.get("per_layer") or {}
    parts = {k: per[k] for k in ("before", "after") if per.get(k)}
    names = list(dict.fromkeys(n for d in parts.values() for n in d))
    return names, parts


def _params(record: dict) -> tuple[list[str], dict[str, dict]]:
    params = record.get("params") or {}
    before = params.get("before") or (record.get("dense") or {}).get("params")
    parts = {k: v for k, v in (("before", before), ("after", params.get("after"))) if v}
    names = [c for c in COMPONENT_ORDER if any(c in d for d in parts.values())]
    names += sorted({c for d in parts.values() for c in d} - set(names))
    return names, parts


# -- sections -------------------------------------------------------------------------------
def _section_setup(record: dict) -> str:
    out = ["## Setup", ""]
    if "seed" in record:
        out += [f"Seed: {record['seed']}", ""]
    versions = record.get("versions") or {}
    if versions:
        out += [_table(["package", "version"], [[k, v] for k, v in versions.items()]), ""]
    out += ["Configuration:", "", "```json", json.dumps(record.get("config"), indent=2,
                                                         sort_keys=True, default=str), "```"]
    return "\n".join(out)


def write_report(run_dir: str | os.PathLike, record: dict, write_record: bool = True) -> Path:
    """Write report.md, points.csv, latency.csv, record.json (unless write_record is False:
    `sparsekernels report` on a run that may still be going must not overwrite the run's own
    record) and the plots to run_dir; return the report.md path. The record is checked
    before anything is written."""
    record = _checked_record(record)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    points = record.get("points") or []
    latency = record.get("latency") or []
    layer_names, layer_parts = _per_layer(record)
    comp_names, comp_parts = _params(record)

    md = ["# sparsekernels pruning report", ""]
    config = record.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict):
        model = ", ".join([f"`{model.get('name_or_path', '?')}`"]
                          + [f"{k} {v}" for k, v in model.items() if k != "name_or_path"])
    if model:
        md += [f"Model: {model}", ""]
    md += [_headline(record), ""]

    def plot(key: str, ok: bool, draw: Callable[[Path], None], why: str) -> list[str]:
        path = run_dir / PLOTS[key]
        if ok:
            draw(path)
            return [f"![{key}]({PLOTS[key]})", ""]
        if path.exists():
            path.unlink()  # a plot left from an earlier report would contradict this one
        return [f"_No plot: {why}._", ""]

    # accuracy vs sparsity
    md += ["## Accuracy vs encoder sparsity", ""]
    md += plot("accuracy", bool(points), lambda p: _plot_accuracy(record, p),
               "the record has no accuracy points")
    if points:
        md += [_table(["stage", "step", "encoder sparsity", "accuracy"],
                      [[p["stage"], p["step"], _pct(p["sparsity"]), _num(p["accuracy"])]
                       for p in points]), "", f"Data: [{POINTS_CSV}]({POINTS_CSV})", ""]
        md += _targets(record)

    # latency vs sparsity
    md += ["## Latency vs sparsity", ""]
    md += plot("latency", bool(latency), lambda p: _plot_latency(record, p),
               "the record has no latency measurements")
    if latency:
        dense_ms = _dense_ms(latency)
        md += [_table(["variant", "encoder sparsity", "ms", "speedup vs dense"],
                      [[r["variant"], _pct(r["sparsity"]), _num(float(r["ms"]), "{:.3f}"),
                        f"x{dense_ms / r['ms']:.2f}" if dense_ms and r["ms"] else "n/a"]
                       for r in latency]), "", f"Data: [{LATENCY_CSV}]({LATENCY_CSV})", ""]

    # per-layer time
    md += ["## Per-layer time (torch.profiler)", ""]
    md += plot("per_layer", bool(layer_parts),
               lambda p: _grouped_bars(p, "Time per layer", "ms (median)", layer_names,
                                       {k: [float(v.get(n, 0.0)) for n in layer_names]
                                        for k, v in layer_parts.items()}),
               "the record has no per-layer times")
    if layer_parts:
        b, a = layer_parts.get("before", {}), layer_parts.get("after", {})
        md += [_table(["module", "before (ms)", "after (ms)", "after / before"],
                      [[n, _num(b.get(n), "{:.3f}"), _num(a.get(n), "{:.3f}"),
                        f"{a[n] / b[n]:.2f}" if b.get(n) and a.get(n) is not None else "n/a"]
                       for n in layer_names]), ""]

    # parameters by component
    md += ["## Parameters by component", ""]
    md += plot("params", bool(comp_parts),
               lambda p: _grouped_bars(p, "Parameters by component", "parameters", comp_names,
                                       {k: [int(v.get(n, 0)) for n in comp_names]
                                        for k, v in comp_parts.items()}),
               "the record has no parameter counts")
    if comp_parts:
        b, a = comp_parts.get("before", {}), comp_parts.get("after", {})
        md += [_table(["component", "before", "after", "kept"],
                      [[n, _num(b.get(n)), _num(a.get(n)),
                        _pct(a[n] / b[n]) if b.get(n) and a.get(n) is not None else "n/a"]
                       for n in comp_names]
                      + [["total", _num(_total(b)), _num(_total(a)),
                          _pct(_total(a) / _total(b)) if b and a else "n/a"]]), ""]

    final = record.get("final") or {}
    if final:
        md += ["## Final", "", _table(["", "value"], [[k, _num(v)] for k, v in final.items()]), ""]
    md += [_section_setup(record), ""]

    _write_text(run_dir / POINTS_CSV, _csv_text(points, POINT_FIELDS))
    _write_text(run_dir / LATENCY_CSV, _csv_text(latency, LATENCY_FIELDS))
    if write_record:
        _write_text(run_dir / RECORD_FILE, json.dumps(record, indent=2, sort_keys=False) + "\n")
    report = run_dir / REPORT_FILE
    _write_text(report, "\n".join(md))
    return report
