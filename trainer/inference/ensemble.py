"""Combining members' probabilities, and the metrics that judge probabilities: NLL and calibration.

Everything is kept as sums (like `trainer/metrics.py`) so that ranks combine exactly with one
all_reduce. Ranking metrics come from `MetricState` fed with log-probabilities: the ranking of
log p equals the ranking of p, and the summed "loss" is then the negative log-likelihood.
"""
from __future__ import annotations

import torch
from torch import Tensor

from trainer.metrics import MetricState
from trainer.runtime import distributed

COMBINE = ("mean", "geometric")
# log(0) would make one confident wrong member dominate the NLL forever; clamp as sklearn's log_loss does
EPS = 1e-12


def combine(probs: list[Tensor], mode: str = "mean") -> Tensor:
    """[N, C] probabilities of the ensemble: the members' mean, or their normalised geometric mean."""
    if not probs:
        raise ValueError("no member probabilities to combine")
    stacked = torch.stack([p.double() for p in probs])
    if mode == "mean":
        return stacked.mean(0)
    if mode == "geometric":
        logp = stacked.clamp_min(EPS).log().mean(0)
        return torch.softmax(logp, dim=1)
    raise ValueError(f"combine must be one of {COMBINE}, got {mode!r}")


class Calibration:
    """Expected calibration error over equal-width confidence bins (Guo et al. 2017), as sums."""

    def __init__(self, bins: int = 15, device: torch.device | str = "cpu") -> None:
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64, device=device)
        self.confidence = torch.zeros(bins, dtype=torch.float64, device=device)
        self.correct = torch.zeros(bins, dtype=torch.float64, device=device)

    def update(self, probs: Tensor, targets: Tensor) -> None:
        conf, pred = probs.double().max(dim=1)
        # bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 goes to bin 0
        index = (conf * self.bins).ceil().long().clamp(1, self.bins) - 1
        self.count.index_add_(0, index, torch.ones_like(conf))
        self.confidence.index_add_(0, index, conf)
        self.correct.index_add_(0, index, (pred == targets.to(pred.device)).double())

    def all_reduce(self) -> Calibration:
        flat = distributed.all_sum(torch.cat([self.count, self.confidence, self.correct]))
        self.count, self.confidence, self.correct = flat.split(self.bins)
        return self

    def ece(self) -> float:
        n = float(self.count.sum())
        if n == 0:
            raise ValueError("Calibration.ece() on an empty state")
        gap = (self.confidence - self.correct).abs()  # per bin: |sum conf - sum correct|
        return float(gap.sum()) / n

    def diagram(self) -> list[dict[str, float]]:
        """Per bin: range, count, mean confidence, accuracy (for a reliability diagram)."""
        rows = []
        for b in range(self.bins):
            n = float(self.count[b])
            rows.append({"low": b / self.bins, "high": (b + 1) / self.bins, "count": n,
                         "confidence": float(self.confidence[b]) / n if n else float("nan"),
                         "accuracy": float(self.correct[b]) / n if n else float("nan")})
        return rows


class ProbabilityMetrics:
    """top-1/top-5/MRR/balanced accuracy, NLL and ECE of probability predictions."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", bins: int = 15) -> None:
        self.ranking = MetricState(num_classes, device)
        self.calibration = Calibration(bins, device)

    def update(self, probs: Tensor, targets: Tensor) -> None:
        logp = probs.double().clamp_min(EPS).log()
        nll = -logp.gather(1, targets.to(logp.device)[:, None]).sum()
        self.ranking.update(logp, targets, loss_sum=nll)
        self.calibration.update(probs, targets)

    def all_reduce(self) -> ProbabilityMetrics:
        self.ranking.all_reduce()
        self.calibration.all_reduce()
        return self

    def compute(self) -> dict:
        values = self.ranking.compute()
        values["nll"] = values.pop("loss")
        values["ece"] = self.calibration.ece()
        return values
