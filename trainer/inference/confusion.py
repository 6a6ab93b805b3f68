"""The confusion of a classifier as sparse (true, predicted) counts: per-class precision/recall and the
most confused pairs.

Sparse because the field's class counts make a dense matrix impractical: 10,000 PlantCLEF species
would need 800 MB per rank, while the number of distinct pairs is bounded by the test set. Ranks merge
their counts with one `all_gather_object` at the end (a few thousand small tuples at most).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trainer.runtime import distributed


@dataclass(frozen=True)
class ClassRow:
    index: int
    support: int       # samples whose true class this is
    predicted: int     # samples predicted as this class
    correct: int

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else math.nan

    @property
    def recall(self) -> float:
        return self.correct / self.support if self.support else math.nan

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else (0.0 if self.support else math.nan)


class Confusion:
    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.pairs: Counter[tuple[int, int]] = Counter()

    def update(self, scores: Tensor, targets: Tensor) -> None:
        """Add a batch of [N, C] scores (argmax = prediction; ties go to the lower index, as in metrics)."""
        pred = scores.argmax(dim=1).cpu().long()
        codes = targets.cpu().long() * self.num_classes + pred
        values, counts = torch.unique(codes, return_counts=True)
        for code, n in zip(values.tolist(), counts.tolist()):
            self.pairs[divmod(code, self.num_classes)] += n

    def all_reduce(self) -> Confusion:
        gathered = distributed.gather(dict(self.pairs), everywhere=True)
        self.pairs = Counter()
        for part in gathered:
            self.pairs.update(part)
        return self

    def rows(self) -> list[ClassRow]:
        support, predicted, correct = Counter(), Counter(), Counter()
        for (true, pred), n in self.pairs.items():
            support[true] += n
            predicted[pred] += n
            if true == pred:
                correct[true] += n
        return [ClassRow(c, support[c], predicted[c], correct[c]) for c in range(self.num_classes)]

    def most_confused(self, k: int) -> list[tuple[int, int, int]]:
        """The k largest off-diagonal cells as (true, predicted, count); ties by class indices."""
        off = [(t, p, n) for (t, p), n in self.pairs.items() if t != p]
        return sorted(off, key=lambda x: (-x[2], x[0], x[1]))[:k]

    def errors_per_class(self) -> Counter[int]:
        """Errors a class takes part in, as the true or the predicted class."""
        errors: Counter[int] = Counter()
        for (true, pred), n in self.pairs.items():
            if true != pred:
                errors[true] += n
                errors[pred] += n
        return errors

    def matrix(self, classes: list[int]) -> np.ndarray:
        """Dense counts restricted to `classes`: rows true, columns predicted."""
        where = {c: i for i, c in enumerate(classes)}
        out = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for (true, pred), n in self.pairs.items():
            if true in where and pred in where:
                out[where[true], where[pred]] += n
        return out

    def shown_classes(self, limit: int) -> list[int]:
        """Every class when there are at most `limit`; else the `limit` classes with the most errors."""
        if self.num_classes <= limit:
            return list(range(self.num_classes))
        errors = self.errors_per_class()
        ranked = sorted(range(self.num_classes), key=lambda c: (-errors[c], c))
        return sorted(ranked[:limit])
