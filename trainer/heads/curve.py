"""The learning curve of a head: accuracy against the number of training images, without retraining a CNN.

Nested fractions of the training split (each class's rows in one seeded order, the first
ceil(fraction x count) of them, at least one), each fitted with the settings the search chose and scored
on the test split. Fitted with the scikit-learn pipeline whatever `head.engine` is: the curve is for
tables one node holds. Files: `head_curve.csv`, `head_curve.png` (the bag curve's plot).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from trainer.heads import sklearn_engine
from trainer.heads.config import HeadRunConfig
from trainer.heads.report import metrics
from trainer.heads.table import FeatureSet
from trainer.inference import plots
from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_write

COLUMNS = ("fraction", "train_images", "top1", "balanced_acc", "nll", "ece")
CSV_FILE, PLOT_FILE = "head_curve.csv", "head_curve.png"


def nested(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Row indices per fraction; each set contains the previous one."""
    order = np.random.default_rng(seed).permutation(len(labels))
    per_class = [order[labels[order] == c] for c in np.unique(labels)]
    return [np.sort(np.concatenate([rows[:max(1, math.ceil(f * len(rows)))] for rows in per_class]))
            for f in fractions]


def run(cfg: HeadRunConfig, data: FeatureSet, params: dict, out: Path) -> list[dict]:
    train = [np.concatenate(data.matrix(s, cfg.inputs), axis=1) for s in (cfg.train_split, cfg.test_split)]
    labels = data.splits[cfg.train_split].labels
    known = labels >= 0
    x, y = train[0][known], labels[known]
    test_labels = data.splits[cfg.test_split].labels
    widths = [a.shape[1] for a in data.matrix(cfg.test_split, cfg.inputs)]
    rows = []
    for fraction, subset in zip(cfg.curve, nested(y, list(cfg.curve), cfg.seed)):
        if len(np.unique(y[subset])) < 2:
            raise ConfigError(f"curve: fraction {fraction} keeps one class only; start from a larger one")
        small = replace(cfg, pca=min(cfg.pca, len(subset), widths[1])) if cfg.pca else cfg
        pipe = sklearn_engine.pipeline(small, params, *widths)
        pipe.fit(x[subset], y[subset])
        values, _, _ = metrics(sklearn_engine.predict(pipe, train[1], len(data.classes)), test_labels,
                               len(data.classes))
        rows.append({"fraction": fraction, "train_images": len(subset),
                     **{k: values[k] for k in COLUMNS[2:]}})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    atomic_write(out / CSV_FILE, buffer.getvalue())
    plots.learning_curve_png(out / PLOT_FILE, rows, cfg.test_split)
    return rows
