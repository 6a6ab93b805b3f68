"""What every engine of a head returns: the one contract between `run.py` and `sklearn_engine.py` or
`spark_engine.py`.

An engine fits the head described by `HeadRunConfig` on the training split of a `FeatureSet`, searches
its candidates (`HeadModel.grid()`) on the validation split, refits the chosen one on the whole training
split, writes its model into the output folder (no pickle) and returns the probabilities of the
validation and test splits, row for row in each split's key order, over the feature set's full class
list (a class that training never saw has probability 0). The report, the comparison, the thresholds
and the learning curve are built from this record alone, so the engines cannot disagree about them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trainer.runtime.exits import ConfigError


@dataclass
class Fitted:
    engine: str
    params: dict                                     # the chosen candidate
    search: list[dict]                               # {"params", "val_top1", "val_nll", "fit_s"} each
    probs: dict[str, np.ndarray]                     # split -> float64 [N, C], rows in key order
    pairs: list[dict] = field(default_factory=list)  # one-vs-one: {"a", "b", "n", "accuracy"} per pair
    imputed: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> native column -> count
    fit_s: float = 0.0                               # the final fit on the whole training split
    fit_rows_per_s: float = 0.0
    predict_rows_per_s: float = 0.0
    model_files: list[str] = field(default_factory=list)  # relative to the output folder


def check_training_labels(labels: np.ndarray, classes: list[str], split: str) -> list[int]:
    """The classes present in the training labels; a single one is an error (nothing to separate)."""
    seen = sorted(set(int(v) for v in labels if v >= 0))
    if len(seen) < 2:
        names = [classes[i] for i in seen]
        raise ConfigError(f"train_split: split {split!r} has {len(seen)} class(es) {names}: a classifier "
                          f"needs at least two")
    return seen


def full_probs(probs: np.ndarray, model_classes: list[int], num_classes: int) -> np.ndarray:
    """[N, C] over every class: the model's columns where it knows the class, 0 elsewhere."""
    out = np.zeros((len(probs), num_classes), np.float64)
    out[:, model_classes] = probs
    return out


def best_candidate(search: list[dict]) -> int:
    """Index of the chosen candidate: the highest validation top-1, then the lowest validation NLL, then
    the first listed (the grid's order is fixed, so the choice is reproducible)."""
    return min(range(len(search)), key=lambda i: (-search[i]["val_top1"], search[i]["val_nll"], i))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood over labelled rows, clamped as evaluate's metrics are."""
    keep = labels >= 0
    picked = probs[keep, labels[keep]]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def top1(probs: np.ndarray, labels: np.ndarray) -> float:
    keep = labels >= 0
    return float((probs[keep].argmax(1) == labels[keep]).mean())


def search_rows(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Up to `limit` training rows for the search: a seeded sample, every class kept where it can be
    (each class's first row in the sample's order comes first)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    _, first = np.unique(labels[order], return_index=True)
    chosen = np.concatenate([order[first], np.delete(order, first)])[:limit]
    return np.sort(chosen)
