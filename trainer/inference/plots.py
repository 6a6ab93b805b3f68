"""Report figures as PNG files: the confusion matrix, the reliability diagram, the learning curve.

matplotlib's object API (`Figure`, no pyplot): no global figure state and no display backend, which
a compute node does not have. Files are written to a temporary name and renamed, like every report.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from trainer.runtime.files import atomic_path

# cells are annotated with counts up to this many classes; past it the numbers are unreadable
ANNOTATE_MAX = 25


def save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def confusion_png(path: Path, counts: np.ndarray, names: Sequence[str], support: Sequence[int],
                  title: str) -> Path:
    """Rows are true classes, normalised by each class's full support (so a row shows where its samples
    went, even when only some columns are shown); colour is that fraction, text the count."""
    k = len(names)
    frac = counts / np.maximum(np.asarray(support, dtype=np.float64), 1)[:, None]
    side = min(4 + 0.32 * k, 40)  # about 0.3 inch per class keeps 8-pt labels apart
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    # square-root colour scale: a 2% confusion must stay visible next to a 95% diagonal
    image = ax.imshow(frac, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    font = max(4, min(10, 260 // max(k, 1)))
    ax.set_xticks(range(k), labels=names, rotation=90, fontsize=font)
    ax.set_yticks(range(k), labels=names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if k <= ANNOTATE_MAX:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=font,
                            color="white" if frac[i, j] > 0.3 else "black")
    return save(fig, path)


def reliability_png(path: Path, diagrams: Mapping[str, list[dict]], eces: Mapping[str, float],
                    highlight: str) -> Path:
    """Accuracy against confidence per bin for every model (the `highlight` one drawn as bars), and
    below it how many predictions fall in each bin: a gap above the diagonal is under-confidence."""
    fig = Figure(figsize=(6.5, 7.5))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    rows = diagrams[highlight]
    width = rows[0]["high"] - rows[0]["low"]
    centres = [(r["low"] + r["high"]) / 2 for r in rows]
    accuracy = [0.0 if math.isnan(r["accuracy"]) else r["accuracy"] for r in rows]
    top.bar(centres, accuracy, width=width, edgecolor="black", linewidth=0.5, alpha=0.35,
            label=f"{highlight} (ECE {eces[highlight]:.3f})")
    for name, bins in diagrams.items():
        seen = [r for r in bins if r["count"] > 0]
        style = {"linewidth": 2, "color": "black"} if name == highlight else {"linewidth": 1, "alpha": 0.7}
        top.plot([r["confidence"] for r in seen], [r["accuracy"] for r in seen], marker="o", markersize=3,
                 label=None if name == highlight else f"{name} (ECE {eces[name]:.3f})", **style)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title("Reliability diagram")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [r["count"] for r in rows], width=width, color="tab:blue", edgecolor="black",
               linewidth=0.5)
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel(f"{highlight}\nsamples")
    return save(fig, path)


def learning_curve_png(path: Path, rows: list[dict], split: str) -> Path:
    """Accuracy against training images (log x), each point labelled with its fraction."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    x = [r["train_images"] for r in rows]
    for key, label in (("top1", "top-1 accuracy"), ("balanced_acc", "balanced accuracy")):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    for r in rows:
        ax.annotate(f"{r['fraction']:g}", (r["train_images"], r["top1"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(x, [str(n) for n in x])  # the counts themselves, not crowded minor log labels
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("training images (log scale)")
    ax.set_ylabel(f"accuracy on {split}")
    ax.set_title("learning curve (labels: fraction of the training split)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    return save(fig, path)


def precision_coverage_png(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                           points: Mapping[str, tuple[float, float]], targets: Sequence[float],
                           highlight: str) -> Path:
    """Precision against coverage of one global confidence threshold for every model (the `highlight`
    one thicker), each model's per-class-threshold operating point as a marker in its colour, and a
    dashed line at each target precision: where a curve crosses it is what one global threshold buys."""
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    colours = {}
    for name, (coverage, precision) in curves.items():
        thick = {"linewidth": 2.5, "color": "black", "zorder": 3}
        style = thick if name == highlight else {"linewidth": 1, "alpha": 0.8}
        (line,) = ax.plot(coverage, precision, label=name, **style)
        colours[name] = line.get_color()
    for name, (coverage, precision) in points.items():
        ax.plot([coverage], [precision], marker="o", markersize=8 if name == highlight else 6,
                markeredgecolor="black", color=colours.get(name, "tab:red"), linestyle="none", zorder=4)
    for target in targets:
        ax.axhline(target, linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"{target:g}", (1.0, target), textcoords="offset points", xytext=(3, 0),
                    va="center", fontsize=8, color="grey", annotation_clip=False)
    # zoom on the precisions that occur: the interesting part is a few points below 1, not 0..1
    lows = [float(np.nanmin(p)) for _, p in curves.values() if np.isfinite(p).any()]
    lows += [p for _, p in points.values() if math.isfinite(p)] + [float(t) for t in targets]
    ax.set_xlim(0, 1)
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 0.02), 1.005)
    ax.set_xlabel("coverage (fraction accepted automatically)")
    ax.set_ylabel("precision of the accepted")
    ax.set_title("Precision against coverage (markers: per-class thresholds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return save(fig, path)


def recall_vs_count_png(path: Path, counts: Sequence[int], recalls: Mapping[str, Sequence[float]],
                        edges: Sequence[int], highlight: str) -> Path:
    """Per-class recall against the class's training count (log x), one point per class: the
    `highlight` model (the ensemble) dark, the others as lighter points; dashed lines at the frequency
    bins' edges. Classes without samples in the evaluated split have no recall and are left out; a class
    without training samples is drawn at 0.5, left of every real count."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    x = np.maximum(np.asarray(counts, dtype=np.float64), 0.5)
    for name, recall in sorted(recalls.items(), key=lambda item: item[0] == highlight):
        y = np.asarray(recall, dtype=np.float64)
        seen = np.isfinite(y)
        style = ({"s": 22, "color": "black", "zorder": 3} if name == highlight else {"s": 12, "alpha": 0.35})
        ax.scatter(x[seen], y[seen], label=name, **style)
    for edge in edges:
        ax.axvline(edge, linestyle="--", color="grey", linewidth=1)
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training samples of the class (log scale)")
    ax.set_ylabel("recall")
    ax.set_title("Per-class recall against training count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)
