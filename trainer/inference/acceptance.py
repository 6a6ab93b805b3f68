"""How many objects a bag lets a taxonomist accept without a look, at what precision, on a test split.

Per model (each member and the ensemble) and per object, the top-1 confidence and class are kept,
raw and calibrated, and gathered once at the end (a few numbers per object). Two views come out:
- the per-class thresholds fitted on validation (`calibration.json`) applied to this split: the
  coverage they reach and the precision they keep, overall and per class: what `predict` will do;
- the precision-coverage curve of one global threshold swept over this split, and the largest
  coverage at each asked precision: a threshold chosen on the test split itself, so an upper bound
  on what a threshold fitted elsewhere reaches; it compares models before and after scaling.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from trainer.inference import calibration as fitting
from trainer.inference.scoring import ENSEMBLE, Scorer, Scores
from trainer.runtime import distributed


class Decisions:
    """Top-1 confidence and class per object and model, raw and calibrated, on this rank."""

    def __init__(self, names: list[str]) -> None:
        self.models = [*names, ENSEMBLE]
        self.parts: dict[tuple[str, int], list[np.ndarray]] = {(m, c): [] for m in self.models
                                                                for c in (0, 1)}
        self.labels: list[np.ndarray] = []

    def update(self, scores: Scores, labels: Tensor) -> None:
        for calibrated, probs in ((1, [*scores.members, scores.ensemble]),
                                  (0, [*scores.raw_members, scores.raw_ensemble])):
            for model, p in zip(self.models, probs):
                conf, pred = p.max(dim=1)
                self.parts[(model, calibrated)].append(torch.stack([conf, pred.double()]).cpu().numpy())
        self.labels.append(labels.cpu().numpy())

    def gathered(self) -> tuple[dict[tuple[str, int], np.ndarray], np.ndarray]:
        """Every rank's objects, on every rank: {(model, calibrated): [2, N] (confidence, class)}, labels."""
        mine = ({k: np.concatenate(v, axis=1) if v else np.zeros((2, 0)) for k, v in self.parts.items()},
                np.concatenate(self.labels) if self.labels else np.zeros(0, dtype=np.int64))
        parts = distributed.gather(mine, everywhere=True)
        merged = {k: np.concatenate([p[0][k] for p in parts], axis=1) for k in mine[0]}
        return merged, np.concatenate([p[1] for p in parts])


def report(decisions: Decisions, scorer: Scorer, classes: list[str], precisions: list[float]) -> dict:
    """The acceptance section of the evaluation report (see the module docstring)."""
    merged, labels = decisions.gathered()
    out: dict = {"precisions": list(precisions), "calibrated": scorer.calibrated, "coverage_at": {},
                 "curves": {}, "thresholds": {}}
    for stage in ((0, 1) if scorer.calibrated else (0,)):
        name = "after" if stage else "before"
        out["coverage_at"][name] = {
            m: {str(p): _coverage_at(merged[(m, stage)], labels, p) for p in precisions}
            for m in decisions.models}
    for m in decisions.models:
        conf, pred = merged[(m, int(scorer.calibrated))]
        coverage, precision, _ = fitting.precision_coverage_curve(conf, pred == labels)
        out["curves"][m] = _thin(coverage, precision)
        thresholds = scorer.thresholds(m)
        if thresholds is not None:
            out["thresholds"][m] = fitting.coverage_report(conf, pred.astype(np.int64), labels, thresholds,
                                                           classes)
            out["thresholds"][m]["target_precision"] = thresholds.target_precision
            out["thresholds"][m]["global_classes"] = [c for c, s in zip(classes, thresholds.source)
                                                      if s == "global"]
    return out


def _coverage_at(decided: np.ndarray, labels: np.ndarray, precision: float) -> float:
    return fitting.coverage_at_precision(decided[0], decided[1] == labels, precision)


def _thin(coverage: np.ndarray, precision: np.ndarray, points: int = 400) -> dict[str, list[float]]:
    """At most `points` points of a curve: enough for a plot, small enough for report.json."""
    keep = np.unique(np.linspace(0, len(coverage) - 1, min(points, len(coverage))).round().astype(int))
    return {"coverage": coverage[keep].tolist(), "precision": precision[keep].tolist()}


def markdown(section: dict) -> list[str]:
    """The acceptance tables of report.md."""
    stages = list(section["coverage_at"])
    head = [f"coverage@{p} {s}" for p in section["precisions"] for s in stages]
    lines = ["", "## Automatic acceptance", "",
             "Coverage at precision p: the largest share of objects whose top-1 confidence clears one global "
             "threshold chosen on this split while precision stays >= p (an upper bound"
             + (", before and after temperature scaling)." if len(stages) > 1 else ")."), "",
             "| model | " + " | ".join(head) + " |", "|---" + "|---:" * len(head) + "|"]
    models = list(section["coverage_at"][stages[0]])
    for m in models:
        cells = [f"{section['coverage_at'][s][m][str(p)]:.3f}" for p in section["precisions"] for s in stages]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if section["thresholds"]:
        lines += ["", "Per-class thresholds fitted on validation (`calibration.json`), applied here:", "",
                  "| model | target precision | coverage | precision reached | "
                  "classes on the global threshold |",
                  "|---|---:|---:|---:|---|"]
        for m, t in section["thresholds"].items():
            fallback = t["global_classes"]
            shown = ", ".join(fallback[:8]) + (f", ... ({len(fallback)})" if len(fallback) > 8 else "")
            lines.append(f"| {m} | {t['target_precision']} | {t['coverage']:.3f} | {_fmt(t['precision'])} | "
                         f"{shown or '-'} |")
    else:
        lines += ["", "No calibration.json applied: no per-class thresholds (`taxotrain-calibrate`)."]
    return lines


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
