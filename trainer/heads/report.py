"""A head's report on the test split, in `taxotrain-evaluate`'s words.

The metrics come from the same sums as the bag's report (`trainer/inference/ensemble.py:
ProbabilityMetrics`, `confusion.py`), so `top1`, `top5`, `mrr`, `balanced_acc`, `nll`, `ece` and the
per-class recall mean the same thing in both and `compare.md` can set them side by side. Test objects of a
class that training never saw stay in the metrics (the head cannot be right on them) and are listed
apart. Files: `report.json`, `report.md`, `per_class.csv`, `reliability.png`, `pairs.csv` (one-vs-one).
"""
from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import numpy as np
import torch

from trainer.heads.engine import Fitted
from trainer.inference import frequency, plots
from trainer.inference.calibration import Thresholds, coverage_report
from trainer.inference.confusion import Confusion
from trainer.inference.ensemble import ProbabilityMetrics
from trainer.inference.evaluate import csv_text
from trainer.runtime.files import atomic_write
from trainer.tracking.tracker import jsonable

SUMMARY_KEYS = ("top1", "top5", "mrr", "balanced_acc", "macro_top5", "nll", "ece", "n")
FILES = {"json": "report.json", "md": "report.md", "csv": "per_class.csv", "reliability": "reliability.png",
         "pairs": "pairs.csv"}


def metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[dict, list[dict], Confusion]:
    """evaluate's summary values and diagram of the labelled rows, and their confusion."""
    keep = labels >= 0
    p, y = torch.from_numpy(probs[keep]), torch.from_numpy(labels[keep])
    state = ProbabilityMetrics(num_classes)
    state.update(p, y)
    confusion = Confusion(num_classes)
    confusion.update(p, y)
    return state.compute(), state.calibration.diagram(), confusion


def per_class(values: dict, confusion: Confusion, classes: list[str], train_counts: list[int]) -> list[dict]:
    return [{"class": classes[r.index], "train_count": train_counts[r.index], "support": r.support,
             "predicted": r.predicted, "correct": r.correct, "precision": r.precision, "recall": r.recall,
             "f1": r.f1, "top5_recall": values["per_class_top5"][r.index]} for r in confusion.rows()]


def by_frequency(values: dict, support: list[int], counts: list[int], edges: list[int]) -> dict:
    """The same bins as evaluate's `frequency` section, by the training split's counts."""
    groups = [[i for i, n in enumerate(counts) if bisect.bisect_right(edges, n) == b]
              for b in range(len(edges) + 1)]
    table = frequency.bins(edges)
    for row, members in zip(table, groups):
        row.update(classes=len(members), samples=sum(support[i] for i in members))
    return {"edges": list(edges), "bins": table,
            "scores": [frequency.scores(values["per_class_recall"], support, g) for g in groups]}


def build(name: str, fitted: Fitted, description: dict, classes: list[str], labels: dict[str, np.ndarray],
          splits: tuple[str, str, str], thresholds: Thresholds, edges: list[int]) -> dict:
    """report.json's content for the head called `name`."""
    train, _, test = splits
    counts = np.bincount(labels[train][labels[train] >= 0], minlength=len(classes)).tolist()
    values, diagram, confusion = metrics(fitted.probs[test], labels[test], len(classes))
    rows = per_class(values, confusion, classes, counts)
    test_labels = labels[test]
    unseen = {classes[c]: int((test_labels == c).sum()) for c in range(len(classes))
              if counts[c] == 0 and (test_labels == c).any()}
    probs = fitted.probs[test][test_labels >= 0]
    coverage = coverage_report(probs.max(1), probs.argmax(1), test_labels[test_labels >= 0], thresholds,
                               classes)
    return {"head": name, "split": test, "classes": classes, **description,
            "engine": fitted.engine, "params": fitted.params, "search": fitted.search,
            "model": {name: values}, "reliability": {name: diagram}, "per_class": rows,
            "unseen_in_training": unseen, "imputed": fitted.imputed,
            "frequency": by_frequency(values, [r["support"] for r in rows], counts, edges),
            "acceptance": {"thresholds": thresholds.to_dict(), "test": {k: coverage[k] for k in
                                                                      ("n", "accepted", "coverage",
                                                                       "precision")}},
            "pairs": fitted.pairs, "timing": {"fit_s": fitted.fit_s, "fit_rows_per_s": fitted.fit_rows_per_s,
                                              "predict_rows_per_s": fitted.predict_rows_per_s}}


def markdown(report: dict) -> str:
    name, values = next(iter(report["model"].items()))
    lines = [f"# Head `{name}` on `{report['split']}` ({report['engine']})", "",
             f"Inputs: {report['inputs']}; PCA of the deep part: {report['pca'] or 'none'}; "
             f"chosen on validation: {report['params']}.", "",
             "| model | " + " | ".join(SUMMARY_KEYS) + " | auto coverage | auto precision |",
             "|---" * (len(SUMMARY_KEYS) + 3) + "|"]
    test = report["acceptance"]["test"]
    cells = [f"{values[k]:.4f}" if isinstance(values[k], float) else str(values[k]) for k in SUMMARY_KEYS]
    cells += [f"{test['coverage']:.3f}", _fmt(test["precision"])]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Search on validation", "", "| candidate | val top-1 | val nll | fit s |",
              "|---|---:|---:|---:|"]
    lines += [f"| {s['params']} | {s['val_top1']:.4f} | {s['val_nll']:.4f} | {s['fit_s']:.1f} |"
              for s in report["search"]]
    missing = {s: {k: n for k, n in cols.items() if n} for s, cols in report["imputed"].items()}
    if any(missing.values()):
        lines += ["", "Missing native values, imputed with the training split's medians: " +
                  "; ".join(f"{s}: " + (", ".join(f"{k} {n}" for k, n in cols.items()) or "none")
                            for s, cols in missing.items())]
    if report["unseen_in_training"]:
        lines += ["", "Test classes that training never saw (counted as errors): " +
                  ", ".join(f"{c} ({n})" for c, n in report["unseen_in_training"].items())]
    bins = report["frequency"]
    lines += ["", "## By training frequency", "", "| bin | classes | samples | top-1 | mean recall |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {b['name']} ({b['range']}) | {b['classes']} | {b['samples']} | {_fmt(s['top1'])} | "
              f"{_fmt(s['mean_recall'])} |" for b, s in zip(bins["bins"], bins["scores"])]
    if report["pairs"]:
        worst = sorted(report["pairs"], key=lambda p: _sortable(p["accuracy"]))
        lines += ["", f"## One-vs-one: the 10 hardest of {len(worst)} pairs (all in `pairs.csv`)", "",
                  "| class a | class b | test objects | accuracy |", "|---|---|---:|---:|"]
        lines += [f"| {report['classes'][p['a']]} | {report['classes'][p['b']]} | {p['n']} | "
                  f"{_fmt(p['accuracy'])} |" for p in worst[:10]]
    return "\n".join(lines) + "\n"


def _sortable(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def write(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {kind: out / name for kind, name in FILES.items()}
    atomic_write(files["json"], json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n")
    atomic_write(files["md"], markdown(report))
    atomic_write(files["csv"], csv_text(report["per_class"]))
    name, values = next(iter(report["model"].items()))
    plots.reliability_png(files["reliability"], report["reliability"], {name: values["ece"]}, name)
    if report["pairs"]:
        named = [{"class_a": report["classes"][p["a"]], "class_b": report["classes"][p["b"]], "n": p["n"],
                  "accuracy": p["accuracy"]} for p in report["pairs"]]
        atomic_write(files["pairs"], csv_text(named))
    else:
        files.pop("pairs")
        files_pairs = out / FILES["pairs"]
        files_pairs.unlink(missing_ok=True)  # a rerun as one-vs-rest leaves no stale pair table
    return files
