"""Evaluation by class frequency: how rare classes fare, per bin of TRAINING counts.

A long-tailed collection's headline top-1 is the common classes' score. Binning the classes by how many
training samples they had (`frequency_bins`, edges on the train split's `class_counts` in `_info.json`)
shows what the rare ones get: per bin, the classes, their samples in the evaluated split, top-1 over
those samples, and the mean per-class recall, for every member and the ensemble. Built from the report's
per-class recall and support (`evaluate.per_class`); no second pass over the data.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from pathlib import Path

from shards.info import InfoError, read_info
from trainer.inference.scoring import ENSEMBLE

NAMES = {1: ("rare", "common"), 2: ("rare", "medium", "common")}


def training_counts(shards: str, split: str) -> tuple[tuple[int, ...] | None, str]:
    """The class counts of `split` of the set at `shards`, or None and the reason there are none."""
    try:
        info = read_info(Path(shards).expanduser())
    except InfoError as err:
        return None, str(err)
    found = info.splits.get(split)
    if found is None or found.num_samples == 0:
        return None, f"{shards} has no training split {split!r}: no class counts to bin by"
    if found.class_counts is None:
        return None, f"{shards}: split {split!r} records no class_counts (not built by shards.build)"
    return found.class_counts, f"split {split!r} of {shards}"


def bins(edges: Sequence[int]) -> list[dict]:
    """Name and training-count range of each bin: [0, e0), [e0, e1), ..., [e_last, inf)."""
    names = NAMES.get(len(edges)) or tuple(f"bin {i}" for i in range(len(edges) + 1))
    bounds = [0, *edges, None]
    return [{"name": names[i], "low": low, "high": high,
             "range": f"< {high}" if low == 0 else f">= {low}" if high is None else f"{low}..{high - 1}"}
            for i, (low, high) in enumerate(zip(bounds, bounds[1:]))]


def section(report: dict, counts: Sequence[int] | None, source: str, edges: Sequence[int]) -> dict:
    """`report["frequency"]`: the bins with their classes and samples, and per model (members, then the
    ensemble) top-1 and mean recall in each; `{"skipped": why}` without training counts."""
    if counts is None:
        return {"skipped": source}
    support = [row["support"] for row in report["per_class"]]
    excluded = set(report["excluded_classes"])
    kept = [i for i, name in enumerate(report["classes"]) if name not in excluded]
    groups = [[i for i in kept if bisect.bisect_right(edges, counts[i]) == b] for b in range(len(edges) + 1)]
    table = bins(edges)
    for row, classes in zip(table, groups):
        row.update(classes=len(classes), samples=sum(support[i] for i in classes))
    models = {**report["members"], ENSEMBLE: report["ensemble"]}
    return {"source": source, "edges": list(edges), "train_counts": list(counts), "bins": table,
            "models": {name: [scores(values["per_class_recall"], support, classes) for classes in groups]
                       for name, values in models.items()}}


def scores(recall: Sequence[float], support: Sequence[int], classes: Sequence[int]) -> dict:
    """Top-1 over the samples of `classes` and their mean recall (classes without samples left out of
    both; NaN where none has samples)."""
    seen = [i for i in classes if support[i] > 0]
    samples = sum(support[i] for i in seen)
    if not seen:
        return {"top1": math.nan, "mean_recall": math.nan}
    correct = sum(recall[i] * support[i] for i in seen)
    return {"top1": correct / samples, "mean_recall": sum(recall[i] for i in seen) / len(seen)}


def markdown(frequency: dict) -> list[str]:
    """report.md's section: one line describing the bins, then top-1 and mean recall per model and bin."""
    if "skipped" in frequency:
        return ["", f"By training frequency: skipped ({frequency['skipped']})."]
    table = frequency["bins"]
    described = "; ".join(f"{b['name']} ({b['range']}): {b['classes']} classes, {b['samples']} samples"
                          for b in table)
    header = " | ".join(f"{b['name']} top-1 | {b['name']} recall" for b in table)
    lines = ["", f"## By training frequency (class counts of the {frequency['source']})", "", described, "",
             f"| model | {header} |", "|---" + "|---:" * (2 * len(table)) + "|"]
    for name, per_bin in frequency["models"].items():
        cells = " | ".join(f"{_fmt(s['top1'])} | {_fmt(s['mean_recall'])}" for s in per_bin)
        shown = f"**{name}**" if name == ENSEMBLE else name
        lines.append(f"| {shown} | {cells} |")
    return lines


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def recalls(report: dict) -> dict[str, list[float]]:
    """Per-class recall of every member and of the ensemble, for recall_vs_count.png."""
    models = {**report["members"], ENSEMBLE: report["ensemble"]}
    return {name: list(values["per_class_recall"]) for name, values in models.items()}
