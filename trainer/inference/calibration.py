"""Temperature scaling, automatic-acceptance thresholds and the file that carries both for a bag.

Pure numpy (float64) functions on predictions already made: fitting a temperature (Guo et al. 2017)
for each member and for the ensemble, per-class confidence thresholds that reach a target precision,
and the coverage they buy on a test split. `ece`/`nll` bin and clamp exactly as `ensemble.Calibration`
and `ensemble.ProbabilityMetrics`, so numbers before and after scaling compare with the evaluation report.
The only I/O is `BagCalibration.save` / `load` (JSON, never pickle: a calibration file is data, and
loading it must not run code).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_write, read_regular

# the clamp of ensemble.EPS (kept numeric here so that this module needs no torch): log(0) would let
# one confident wrong prediction dominate the NLL forever
EPS = 1e-12
LOG_EPS = math.log(EPS)
# log T is searched here: T = 0.05 (20x sharper) to T = 20 (20x flatter) spans every temperature fitted
# in practice, and a bounded search in log T treats "twice as sharp" and "twice as flat" alike
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
SOURCES = ("class", "global")
FORMAT = "taxotrain-calibration/1"
FILE_LIMIT = 64 << 20  # a calibration file is a few kB per model; refuse to read a wrong path's gigabytes


# ------------------------------------------------------------------ input checks


def _logits(logits: np.ndarray) -> np.ndarray:
    """[N, C] or [V, N, C] finite floats (float32 is kept: each view is cast to float64 when used)."""
    arr = np.asarray(logits)
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise ValueError(f"logits must be a non-empty [N, C] or [V, N, C] array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("logits contain NaN or infinity")
    return arr


def _probs(probs: np.ndarray) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"probs must be a non-empty [N, C] array, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("probs must be finite and non-negative")
    return arr


def _labels(labels: np.ndarray, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got [{arr.min()}, {arr.max()}]")
    return arr


def _confidences(conf: np.ndarray) -> np.ndarray:
    arr = np.asarray(conf, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"conf must be a non-empty 1-D array of finite numbers, got shape {arr.shape}")
    return arr


def _predictions(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    conf = _confidences(conf)
    return conf, _labels(pred, conf.size, num_classes, "pred"), _labels(labels, conf.size, num_classes)


def _temperature(t: float, key: str = "T") -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{key}: a temperature must be a finite number > 0, got {t!r}")
    return float(t)


# ------------------------------------------------------------------ temperature scaling


def _exp_shifted(view: np.ndarray, rowmax: np.ndarray, t: float) -> np.ndarray:
    """[N, C] float64 exp((z - max z) / t): shifted by the row max, so no exp overflows at any t > 0
    (max(z / t) = max(z) / t). Written out rather than scipy's logsumexp, which is ~7x slower on [N, C]
    and runs once per step of the temperature search."""
    buf = np.subtract(view, rowmax[:, None], dtype=np.float64)
    buf /= t
    return np.exp(buf, out=buf)


def _views(logits: np.ndarray) -> np.ndarray:
    return logits if logits.ndim == 3 else logits[None]


def softmax_t(logits: np.ndarray, T: float) -> np.ndarray:
    """[N, C] float64 softmax(logits / T); for [V, N, C] the mean over views, as the app averages TTA."""
    arr, t = _logits(logits), _temperature(T)
    total = np.zeros(arr.shape[-2:], dtype=np.float64)
    for view in _views(arr):  # one view at a time: V x N x C float64 temporaries would not fit big splits
        e = _exp_shifted(view, view.max(axis=1).astype(np.float64), t)
        total += e / e.sum(axis=1, keepdims=True)
    return total / len(_views(arr))


def _label_log_probs(prepared: list[tuple[np.ndarray, np.ndarray, np.ndarray]], t: float) -> np.ndarray:
    """[N] log of the (clamped) probability of each true class at temperature t, in log space throughout:
    log-softmax per view, then log-mean-exp over views, so a tiny probability keeps its digits.
    `prepared` holds per view (logits, row max, true-class logit minus row max)."""
    total = None
    for view, rowmax, gap in prepared:
        logp = gap / t - np.log(_exp_shifted(view, rowmax, t).sum(axis=1))
        total = logp if total is None else np.logaddexp(total, logp)
    return np.maximum(total - math.log(len(prepared)), LOG_EPS)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) (mean over views for [V, N, C]).

    Bounded Brent search over log T; the result is never worse than T = 1 on these data (a local
    minimum of a non-convex multi-view NLL could be), so calibration can only help where it was fitted."""
    arr = _logits(logits)
    y = _labels(labels, arr.shape[-2], arr.shape[-1])
    rows = np.arange(y.size)
    prepared = []
    for view in _views(arr):  # what does not depend on T, computed once for the whole search
        rowmax = view.max(axis=1).astype(np.float64)
        prepared.append((view, rowmax, view[rows, y].astype(np.float64) - rowmax))

    def loss(log_t: float) -> float:
        return -float(_label_log_probs(prepared, math.exp(log_t)).mean())

    found = minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return math.exp(found.x) if found.fun <= loss(0.0) else 1.0


def fit_ensemble_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the NLL of softmax(log(probs) / T) for an ensemble's combined [N, C] probabilities
    (the members are already averaged, so the ensemble's own logits are log(probs))."""
    return fit_temperature(np.log(np.maximum(_probs(probs), EPS)), labels)


def apply_temperature(probs: np.ndarray, T: float) -> np.ndarray:
    """softmax(log(clamp(probs)) / T); T == 1 returns `probs` itself, bit for bit (no renormalisation)."""
    if _temperature(T) == 1.0:
        return probs
    return softmax_t(np.log(np.maximum(_probs(probs), EPS)), T)


# ------------------------------------------------------------------ precision against coverage


def _sweep(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage, precision and threshold for every distinct confidence, threshold descending."""
    order = np.argsort(-conf, kind="stable")
    ranked = conf[order]
    hits = np.cumsum(correct[order])
    # the last position of each run of equal confidences: a threshold accepts all of its ties or none
    last = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    count = last + 1
    return count / conf.size, hits[last] / count, ranked[last]


def precision_coverage_curve(conf: np.ndarray,
                             correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage, precision, thresholds) of accepting conf >= t, one point per distinct confidence t,
    t descending (so coverage rises); the last point accepts everything: coverage 1, precision = accuracy."""
    conf = _confidences(conf)
    hit = np.asarray(correct)
    if hit.shape != conf.shape:
        raise ValueError(f"correct must have shape {conf.shape}, got {hit.shape}")
    return _sweep(conf, hit.astype(bool))


def coverage_at_precision(conf: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The largest coverage of one global threshold whose precision is >= target; 0.0 if none is."""
    coverage, precision, _ = precision_coverage_curve(conf, correct)
    reached = coverage[precision >= target]
    return float(reached.max()) if reached.size else 0.0


def _lowest_threshold(conf: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest t with precision({conf >= t}) >= target; +inf (never accept) if none or no data."""
    if conf.size == 0:
        return math.inf
    _, precision, thresholds = _sweep(conf, correct)
    reached = np.flatnonzero(precision >= target)
    return float(thresholds[reached[-1]]) if reached.size else math.inf


# ------------------------------------------------------------------ thresholds for automatic acceptance


def _json_threshold(t: float) -> float | None:
    return None if math.isinf(t) else float(t)


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{key}: must be a number, got {value!r}")
    return float(value)


def _threshold_from_json(value: object, key: str) -> float:
    """JSON null is the infinite threshold (never accept): JSON has no infinity."""
    return math.inf if value is None else _number(value, key)


@dataclass
class Thresholds:
    """Per-class confidence thresholds: accept a prediction of class c when its confidence >= per_class[c].
    An infinite threshold (`None` in JSON) never accepts; `support[c]` is how many validation objects
    were predicted as c, `source[c]` whether c's own objects ("class") or all of them ("global") set it."""

    target_precision: float
    global_threshold: float
    per_class: list[float]
    source: list[str]
    support: list[int]
    min_samples: int

    def __post_init__(self) -> None:
        k = len(self.per_class)
        if len(self.source) != k or len(self.support) != k:
            raise ValueError(f"per_class, source and support must have one entry per class, got "
                             f"{k}, {len(self.source)}, {len(self.support)}")
        if not 0 < self.target_precision <= 1:
            raise ValueError(f"target_precision must lie in (0, 1], got {self.target_precision!r}")
        if any(s not in SOURCES for s in self.source):
            raise ValueError(f"source entries must be one of {SOURCES}, got {sorted(set(self.source))}")
        if any(math.isnan(t) for t in [self.global_threshold, *self.per_class]):
            raise ValueError("a threshold is NaN")
        counts = [self.min_samples, *self.support]
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in counts):
            raise ValueError("support and min_samples must be non-negative integers")

    def accept(self, conf: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """[N] bool: conf >= the threshold of the predicted class."""
        limits = np.asarray(self.per_class, dtype=np.float64)
        return np.asarray(conf, dtype=np.float64) >= limits[np.asarray(pred, dtype=np.int64)]

    def to_dict(self) -> dict:
        return {"target_precision": self.target_precision,
                "global_threshold": _json_threshold(self.global_threshold),
                "per_class": [_json_threshold(t) for t in self.per_class], "source": list(self.source),
                "support": list(self.support), "min_samples": self.min_samples}

    @classmethod
    def from_dict(cls, d: Mapping) -> Thresholds:
        if not isinstance(d, Mapping) or not isinstance(d["per_class"], list):
            raise ValueError("thresholds must be an object with a per_class list")
        return cls(target_precision=_number(d["target_precision"], "target_precision"),
                   global_threshold=_threshold_from_json(d["global_threshold"], "global_threshold"),
                   per_class=[_threshold_from_json(t, f"per_class[{i}]")
                              for i, t in enumerate(d["per_class"])],
                   source=list(d["source"]), support=list(d["support"]), min_samples=d["min_samples"])


def fit_thresholds(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, num_classes: int,
                   target_precision: float = 0.95, min_samples: int = 20) -> Thresholds:
    """Per-class thresholds that reach `target_precision` on these (validation) predictions.

    For class c, among the objects predicted as c: the LOWEST confidence t such that the precision of
    {conf >= t} is >= target. Precision is not monotone in t (a wrong prediction at 0.9 can be followed by
    right ones), so stopping at the first t whose precision falls below the target would give up coverage
    that still meets it; every distinct confidence is tried (one sort and a cumulative sum, O(n log n)).
    No t reaching the target gives +inf: the class is never accepted automatically. A class predicted
    fewer than `min_samples` times cannot estimate its own precision, so it takes the global threshold,
    fitted the same way on all objects pooled regardless of class (source "global")."""
    conf, pred, labels = _predictions(conf, pred, labels, num_classes)
    correct = pred == labels
    pooled = _lowest_threshold(conf, correct, target_precision)
    order = np.argsort(pred, kind="stable")
    bounds = np.searchsorted(pred[order], np.arange(num_classes + 1))
    per_class, source, support = [], [], []
    for c in range(num_classes):
        mine = order[bounds[c]:bounds[c + 1]]
        support.append(int(mine.size))
        own = mine.size >= min_samples
        per_class.append(_lowest_threshold(conf[mine], correct[mine], target_precision) if own else pooled)
        source.append("class" if own else "global")
    return Thresholds(float(target_precision), pooled, per_class, source, support, int(min_samples))


def _ratio(part: float, whole: float) -> float:
    return float(part) / float(whole) if whole else math.nan


def coverage_report(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, thresholds: Thresholds,
                    classes: list[str]) -> dict:
    """How much of a (test) split the thresholds accept and how precise that is, overall and per class.
    Precision is NaN where nothing is accepted; coverage_of_predicted is NaN for a class never predicted."""
    k = len(classes)
    if len(thresholds.per_class) != k:
        raise ValueError(f"{k} class names but {len(thresholds.per_class)} thresholds")
    conf, pred, labels = _predictions(conf, pred, labels, k)
    accepted = thresholds.accept(conf, pred)
    correct = pred == labels
    predicted = np.bincount(pred, minlength=k)
    taken = np.bincount(pred[accepted], minlength=k)
    right = np.bincount(pred[accepted & correct], minlength=k)
    rows = [{"class": name, "threshold": _json_threshold(thresholds.per_class[c]),
             "source": thresholds.source[c], "predicted": int(predicted[c]), "accepted": int(taken[c]),
             "precision": _ratio(right[c], taken[c]), "coverage_of_predicted": _ratio(taken[c], predicted[c])}
            for c, name in enumerate(classes)]
    n_accepted = int(accepted.sum())
    return {"n": int(conf.size), "accepted": n_accepted, "coverage": _ratio(n_accepted, conf.size),
            "precision": _ratio(right.sum(), n_accepted), "per_class": rows}


# ------------------------------------------------------------------ probability metrics (as ensemble.py)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error, binned as `ensemble.Calibration`: bin b holds confidences in
    (b/B, (b+1)/B], a confidence of 0 in bin 0."""
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1])
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    index = np.clip(np.ceil(conf * bins), 1, bins).astype(np.int64) - 1
    gap = np.bincount(index, conf, bins) - np.bincount(index, (pred == y).astype(np.float64), bins)
    return float(np.abs(gap).sum()) / conf.size


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, probabilities clamped at EPS as ensemble.py does."""
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1])
    return -float(np.log(np.maximum(p[np.arange(y.size), y], EPS)).sum()) / y.size


# ------------------------------------------------------------------ the calibration file of a bag


def _text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be a string, got {value!r}")
    return value


@dataclass(kw_only=True)
class BagCalibration:
    """The temperatures and thresholds fitted for one bag on one split, with before/after `metrics`.

    `members` maps member name to its temperature, `ensemble` is the temperature of the combined
    probabilities, `thresholds` maps a member name or "ensemble" to its acceptance thresholds."""

    format: str = FORMAT
    split: str
    shards: str
    n: int
    tta: str
    combine: str
    members: dict[str, float]
    ensemble: float
    thresholds: dict[str, Thresholds]
    metrics: dict

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, got {self.format!r}")
        for key in ("split", "shards", "tta", "combine"):
            _text(getattr(self, key), key)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"n: must be a non-negative integer, got {self.n!r}")
        if not isinstance(self.members, dict) or not isinstance(self.thresholds, dict):
            raise ValueError("members and thresholds must be objects keyed by model name")
        if not isinstance(self.metrics, dict):
            raise ValueError("metrics: must be an object")
        self.members = {_text(k, "members"): _temperature(t, f"members.{k}") for k, t in self.members.items()}
        self.ensemble = _temperature(self.ensemble, "ensemble")
        self._check_thresholds()

    def _check_thresholds(self) -> None:
        unknown = sorted(set(self.thresholds) - {*self.members, "ensemble"})
        if unknown:
            raise ValueError(f"thresholds: {unknown} are neither members nor 'ensemble'")
        if any(not isinstance(t, Thresholds) for t in self.thresholds.values()):
            raise ValueError("thresholds: every value must be a Thresholds")
        sizes = {name: len(t.per_class) for name, t in self.thresholds.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"thresholds: the models have different numbers of classes {sizes}")

    def to_dict(self) -> dict:
        return {"format": self.format, "split": self.split, "shards": self.shards, "n": self.n,
                "tta": self.tta, "combine": self.combine, "members": dict(self.members),
                "ensemble": self.ensemble, "thresholds": {k: t.to_dict() for k, t in self.thresholds.items()},
                "metrics": self.metrics}

    def save(self, path: Path) -> Path:
        """Write as JSON atomically (a reader sees the old file or the new one, never a part)."""
        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, raw: Mapping) -> BagCalibration:
        if not isinstance(raw, Mapping):
            raise ValueError("not a JSON object")
        if raw.get("format") != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, got {raw.get('format')!r}")
        thresholds = raw["thresholds"]
        if not isinstance(thresholds, Mapping):
            raise ValueError("thresholds: must be an object keyed by model name")
        fitted = {}
        for name, value in thresholds.items():
            try:
                fitted[name] = Thresholds.from_dict(value)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"thresholds.{name}: {_reason(err)}") from None
        return cls(format=raw["format"], split=raw["split"], shards=raw["shards"], n=raw["n"],
                   tta=raw["tta"], combine=raw["combine"], members=raw["members"], ensemble=raw["ensemble"],
                   thresholds=fitted, metrics=raw["metrics"])

    @classmethod
    def load(cls, path: Path) -> BagCalibration:
        """The calibration in `path`; a `ConfigError` naming the file for anything malformed."""
        try:
            return cls.from_dict(json.loads(read_regular(Path(path), FILE_LIMIT)))
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path}: not a valid taxotrain calibration file ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    return f"missing key {err.args[0]!r}" if isinstance(err, KeyError) else str(err)
