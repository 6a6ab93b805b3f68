"""`compare.md`: the CNN bag and every head of a features folder, on the same test split, in one table.

Rows: the bag's members and ensemble (from the bag's `report.json`, written by `taxotrain-evaluate` on the
test split), then each head found under `<features>/heads/*/report.json`. Columns: evaluate's metrics,
the automatic-acceptance coverage, and top-1 per training-frequency bin (rare, medium, common) where the
reports have the same bins. Rewritten after every head, so running several heads builds one table.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_write

COLUMNS = ("top1", "balanced_acc", "top5", "nll", "ece")
COMPARE_FILE = "compare.md"


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def bag_rows(report: dict, edges: list[int]) -> list[dict]:
    """One row per member and the ensemble, with their bins when the bag's report has the same edges."""
    section = report.get("frequency", {})
    same = section.get("edges") == edges
    models = {**report["members"], "ensemble": report["ensemble"]}
    thresholds = report.get("acceptance", {}).get("thresholds", {})
    return [{"name": f"CNN {name}", "values": values,
             "bins": [s["top1"] for s in section["models"][name]] if same else None,
             "coverage": thresholds.get(name, {}).get("coverage")} for name, values in models.items()]


def head_rows(heads_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(heads_dir.glob("*/report.json")):
        report = read(path)
        if report is None or "model" not in report:
            continue
        name, values = next(iter(report["model"].items()))
        bins = [s["top1"] for s in report["frequency"]["scores"]]
        rows.append({"name": name, "values": values, "bins": bins,
                     "coverage": report["acceptance"]["test"]["coverage"], "report": report})
    return rows


def check_same_split(bag: dict, bag_path: Path, head: dict) -> list[str]:
    """An error when the class lists differ; a note when the object counts do."""
    if bag["classes"] != head["classes"]:
        raise ConfigError(f"bag_report: {bag_path} was written on other classes than the features "
                          f"(another bag or shard set?)")
    if bag.get("split") != head["split"]:
        raise ConfigError(f"bag_report: {bag_path} is a report on split {bag.get('split')!r}, the heads are "
                          f"judged on {head['split']!r}: run taxotrain-evaluate data.split={head['split']}")
    n_bag, n_head = bag["ensemble"]["n"], head["model"][head["head"]]["n"]
    return [] if n_bag == n_head else [f"The bag's report counts {n_bag} test objects, the features "
                                       f"{n_head} (evaluate's exclude_classes, or bad samples)."]


def write(heads_dir: Path, bag_path: Path, edges: list[int]) -> Path:
    heads = head_rows(heads_dir)
    if not heads:
        raise ConfigError(f"no head reports under {heads_dir}")
    bag = read(bag_path)
    notes: list[str] = []
    rows = []
    if bag is None:
        notes.append(f"No bag report at {bag_path}: run `taxotrain-evaluate bag=BAG data.split="
                     f"{heads[0]['report']['split']}` to add the CNN rows.")
    else:
        notes += check_same_split(bag, bag_path, heads[-1]["report"])
        rows += bag_rows(bag, edges)
    rows += heads
    path = heads_dir / COMPARE_FILE
    atomic_write(path, table(rows, heads[0]["report"], notes))
    return path


def table(rows: list[dict], head: dict, notes: list[str]) -> str:
    bins = head["frequency"]["bins"]
    bin_cols = [f"{b['name']} top-1 ({b['classes']} cl.)" for b in bins]
    header = ["model", *COLUMNS, "auto coverage", *bin_cols]
    lines = [f"# CNN bag against classical heads on `{head['split']}`", "",
             "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in rows:
        cells = [_fmt(row["values"][k]) for k in COLUMNS] + [_fmt(row["coverage"])]
        cells += [_fmt(v) for v in row["bins"]] if row["bins"] else ["-"] * len(bins)
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Bins by training count: " + "; ".join(f"{b['name']} {b['range']}" for b in bins) +
              ". auto coverage: share of test objects above their class's threshold (fitted on validation).",
              *[f"\n{n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or isinstance(value, str):
        return "-"
    return f"{value:.4f}"
