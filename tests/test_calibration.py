"""Temperature scaling, acceptance thresholds and the calibration file, against known answers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.inference import ensemble
from trainer.inference.calibration import (
    BagCalibration,
    Thresholds,
    apply_temperature,
    coverage_at_precision,
    coverage_report,
    ece,
    fit_ensemble_temperature,
    fit_temperature,
    fit_thresholds,
    nll,
    precision_coverage_curve,
    softmax_t,
)
from trainer.inference.plots import precision_coverage_png
from trainer.runtime.exits import ConfigError


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One class per row drawn from that row's probabilities (inverse CDF)."""
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((cdf < rng.random(len(probs))[:, None]).sum(1), probs.shape[1] - 1)


def calibrated_set(seed: int, n: int, classes: int = 6, scale: float = 2.5):
    """Logits whose softmax is the true label distribution: (logits, probs, labels)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, (n, classes))
    probs = softmax_t(logits, 1.0)
    return logits, probs, sample_labels(rng, probs)


# ------------------------------------------------------------------ temperature scaling


def test_softmax_t_sums_to_one_and_averages_views():
    rng = np.random.default_rng(0)
    views = rng.normal(0, 3, (4, 50, 7)).astype(np.float32)
    p = softmax_t(views, 2.0)
    assert p.dtype == np.float64 and p.shape == (50, 7)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    one = [torch.softmax(torch.from_numpy(v).double() / 2.0, dim=1).numpy() for v in views]
    np.testing.assert_allclose(p, np.mean(one, axis=0), atol=1e-12)
    assert np.isfinite(softmax_t(np.array([[1e4, -1e4, 0.0]]), 0.05)).all()  # no overflow


@pytest.mark.parametrize("t0", [2.5, 0.5])
def test_fit_temperature_recovers_a_known_temperature(t0):
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 3.0, (20000, 10))
    labels = sample_labels(rng, softmax_t(logits, t0))
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(t0, rel=0.1)
    assert nll(softmax_t(logits, t), labels) <= nll(softmax_t(logits, 1.0), labels)


def test_fit_temperature_on_views_averages_their_probabilities():
    rng = np.random.default_rng(2)
    base = rng.normal(0.0, 3.0, (20000, 8))
    views = base[None] + rng.normal(0.0, 0.5, (3, 20000, 8))
    labels = sample_labels(rng, softmax_t(views, 2.0))
    t = fit_temperature(views, labels)
    assert t == pytest.approx(2.0, rel=0.1)
    assert nll(softmax_t(views, t), labels) <= nll(softmax_t(views, 1.0), labels)


def test_fit_temperature_refuses_empty_input_and_labels_out_of_range():
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((2, 3)), np.array([-1, 0]))
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_fit_ensemble_temperature_sharpens_an_under_confident_mixture():
    _, probs, labels = calibrated_set(3, 20000)
    # averaging with a uniform member (as a mean ensemble of one good and one clueless model does)
    # makes the mixture under-confident: the fitted temperature must sharpen it, T < 1
    mixture = 0.5 * probs + 0.5 / probs.shape[1]
    t = fit_ensemble_temperature(mixture, labels)
    assert t < 1.0
    scaled = apply_temperature(mixture, t)
    np.testing.assert_allclose(scaled.sum(1), 1.0, atol=1e-12)
    assert nll(scaled, labels) < nll(mixture, labels) - 0.05
    assert ece(scaled, labels) < ece(mixture, labels)


def test_apply_temperature_one_is_the_identity_bit_for_bit():
    _, probs, _ = calibrated_set(4, 100)
    probs32 = probs.astype(np.float32)
    assert apply_temperature(probs32, 1.0) is probs32
    assert apply_temperature(probs, 1) is probs
    sharper = apply_temperature(probs, 0.5)
    assert (sharper.max(1) >= probs.max(1) - 1e-12).all()
    with pytest.raises(ValueError):
        apply_temperature(probs, 0.0)
    with pytest.raises(ValueError):
        apply_temperature(probs, math.inf)


# ------------------------------------------------------------------ thresholds


def test_the_lowest_threshold_that_reaches_the_target_wins_although_precision_is_not_monotone():
    # predicted class 0, confidence descending; precision of {conf >= t}: 1, 1/2, 2/3, 3/4, 3/5
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([0, 1, 0, 0, 1])
    th = fit_thresholds(conf, np.zeros(5, dtype=int), labels, 2, target_precision=0.75, min_samples=1)
    assert th.per_class[0] == 0.6  # not 0.9, where a stop-at-first-drop rule would end
    # class 1 was never predicted (0 < min_samples): the global threshold, here pooled = class 0's
    assert th.source == ["class", "global"] and th.support == [5, 0]
    assert th.per_class[1] == th.global_threshold == 0.6
    assert th.accept(conf, np.zeros(5, dtype=int)).tolist() == [True, True, True, True, False]


def test_ties_are_accepted_or_refused_together():
    # alone, the right 0.9 has precision 1; but t = 0.9 also accepts the wrong one at 0.9: 1/2
    conf = np.array([0.9, 0.9, 0.4])
    th = fit_thresholds(conf, np.zeros(3, dtype=int), np.array([0, 1, 0]), 2, target_precision=0.75,
                        min_samples=1)
    assert th.per_class[0] == math.inf


def test_a_rare_class_falls_back_to_the_global_threshold():
    # class 0: 4 predictions; class 1: 2 (< min_samples=3) -> global, fitted on all 6 pooled
    conf = np.array([0.95, 0.9, 0.85, 0.6, 0.8, 0.5])
    pred = np.array([0, 0, 0, 0, 1, 1])
    labels = np.array([0, 0, 1, 0, 1, 0])
    th = fit_thresholds(conf, pred, labels, 2, target_precision=0.8, min_samples=3)
    # pooled by confidence: .95 R, .9 R, .85 W, .8 R, .6 R, .5 W -> precisions 1, 1, 2/3, 3/4, 4/5, 4/6
    assert th.global_threshold == 0.6
    assert th.source == ["class", "global"] and th.support == [4, 2]
    # class 0 alone: .95 R, .9 R, .85 W, .6 R -> 1, 1, 2/3, 3/4: 0.9 is the lowest reaching 0.8
    assert th.per_class == [0.9, 0.6]


def test_a_class_that_never_reaches_the_target_accepts_nothing():
    conf = np.array([0.99, 0.98, 0.97, 0.9, 0.8])
    pred = np.array([1, 1, 1, 0, 0])
    labels = np.array([0, 0, 0, 0, 0])  # every prediction of class 1 is wrong
    th = fit_thresholds(conf, pred, labels, 2, target_precision=0.9, min_samples=2)
    assert th.per_class[1] == math.inf and th.source[1] == "class"
    assert th.to_dict()["per_class"][1] is None
    assert not th.accept(np.ones(3), np.ones(3, dtype=int)).any()  # not even confidence 1
    report = coverage_report(conf, pred, labels, th, ["a", "b"])
    row = report["per_class"][1]
    assert row["threshold"] is None and row["accepted"] == 0 and math.isnan(row["precision"])
    assert row["coverage_of_predicted"] == 0.0


def test_accept_agrees_with_the_coverage_report():
    rng = np.random.default_rng(5)
    _, probs, labels = calibrated_set(5, 3000)
    conf, pred = probs.max(1), probs.argmax(1)
    th = fit_thresholds(conf, pred, labels, 6, target_precision=0.9, min_samples=20)
    test = rng.permutation(3000)[:1000]
    report = coverage_report(conf[test], pred[test], labels[test], th, [f"c{i}" for i in range(6)])
    accepted = th.accept(conf[test], pred[test])
    assert report["n"] == 1000 and report["accepted"] == accepted.sum() > 0
    assert report["coverage"] == pytest.approx(accepted.mean())
    assert report["precision"] == pytest.approx((pred[test] == labels[test])[accepted].mean())
    assert sum(r["accepted"] for r in report["per_class"]) == report["accepted"]
    for c, row in enumerate(report["per_class"]):
        mine = pred[test] == c
        assert row["accepted"] == (accepted & mine).sum()
        assert row["coverage_of_predicted"] == pytest.approx((accepted & mine).sum() / mine.sum())


def test_thresholds_fitted_on_one_half_hold_their_precision_on_the_other():
    _, probs, labels = calibrated_set(6, 40000, scale=3.0)
    conf, pred = probs.max(1), probs.argmax(1)
    assert 0.6 < (pred == labels).mean() < 0.85  # the target is not met by accepting everything
    fit, held = slice(0, 20000), slice(20000, None)
    th = fit_thresholds(conf[fit], pred[fit], labels[fit], 6, target_precision=0.9)
    report = coverage_report(conf[held], pred[held], labels[held], th, [str(c) for c in range(6)])
    assert report["precision"] == pytest.approx(0.9, abs=0.02)
    assert 0.3 < report["coverage"] < 0.7
    for row in report["per_class"]:
        assert row["source"] == "class" and row["precision"] == pytest.approx(0.9, abs=0.04)


def test_thresholds_round_trip_through_json():
    th = Thresholds(0.95, math.inf, [0.5, math.inf, 0.7], ["class", "class", "global"], [30, 25, 3], 20)
    text = json.dumps(th.to_dict(), allow_nan=False)  # strict JSON: infinity written as null
    assert Thresholds.from_dict(json.loads(text)) == th
    with pytest.raises(ValueError, match="one entry per class"):
        Thresholds(0.95, 0.5, [0.5], ["class", "class"], [1], 20)
    with pytest.raises(ValueError, match="source"):
        Thresholds(0.95, 0.5, [0.5], ["own"], [1], 20)


# ------------------------------------------------------------------ precision against coverage


def test_precision_coverage_curve_by_hand():
    conf = np.array([0.6, 0.8, 0.9, 0.8])
    correct = np.array([False, False, True, True])
    coverage, precision, thresholds = precision_coverage_curve(conf, correct)
    assert thresholds.tolist() == [0.9, 0.8, 0.6]  # the two 0.8 are one point
    assert coverage.tolist() == [0.25, 0.75, 1.0]
    assert precision.tolist() == pytest.approx([1.0, 2 / 3, 0.5])
    assert coverage_at_precision(conf, correct, 0.6) == 0.75
    assert coverage_at_precision(conf, correct, 1.0) == 0.25
    assert coverage_at_precision(conf, correct, 0.5) == 1.0
    assert coverage_at_precision(np.array([0.9, 0.5]), np.array([False, False]), 0.5) == 0.0


def test_the_curve_rises_in_coverage_and_ends_at_the_accuracy():
    _, probs, labels = calibrated_set(7, 5000)
    conf = np.round(probs.max(1), 2)  # rounded: many ties
    correct = probs.argmax(1) == labels
    coverage, precision, thresholds = precision_coverage_curve(conf, correct)
    assert (np.diff(coverage) > 0).all() and (np.diff(thresholds) < 0).all()
    assert len(thresholds) == len(np.unique(conf))
    assert coverage[-1] == 1.0 and precision[-1] == pytest.approx(correct.mean())


# ------------------------------------------------------------------ metrics as ensemble.py computes them


@pytest.mark.parametrize("bins", [15, 10])
def test_ece_and_nll_agree_with_the_torch_metrics(bins):
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.full(7, 0.3), 2000)
    # confidences on bin edges and exactly 0 probability of the true class (the clamp)
    probs[:7] = np.eye(7)
    probs[7:12] = np.array([0.2, 0.2, 0.2, 0.2, 0.2, 0, 0])
    labels = rng.integers(0, 7, 2000)
    labels[:7] = (np.arange(7) + 1) % 7
    torch_p, torch_y = torch.from_numpy(probs), torch.from_numpy(labels)
    metrics = ensemble.ProbabilityMetrics(7, bins=bins)
    metrics.update(torch_p, torch_y)
    values = metrics.compute()
    assert nll(probs, labels) == pytest.approx(values["nll"], abs=1e-9)
    assert ece(probs, labels, bins) == pytest.approx(values["ece"], abs=1e-9)
    assert nll(probs, labels) > -math.log(ensemble.EPS) * 7 / 2000  # the clamped rows count
    calibration = ensemble.Calibration(bins)
    calibration.update(torch_p, torch_y)
    assert ece(probs, labels, bins) == pytest.approx(calibration.ece(), abs=1e-9)


# ------------------------------------------------------------------ the calibration file


def bag_calibration() -> BagCalibration:
    th = Thresholds(0.95, 0.97, [0.9, math.inf, 0.97], ["class", "class", "global"], [40, 25, 2], 20)
    return BagCalibration(split="val", shards="/data/shards", n=67, tta="flip", combine="mean",
                          members={"resnet": 1.4, "vit": 0.9}, ensemble=1.2,
                          thresholds={"resnet": th, "vit": th, "ensemble": th},
                          metrics={"ensemble": {"nll_before": 0.5, "nll_after": 0.4, "ece_after": math.nan}})


def test_bag_calibration_round_trips(tmp_path: Path):
    cal = bag_calibration()
    path = cal.save(tmp_path / "calibration.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "taxotrain-calibration/1" and raw["thresholds"]["vit"]["per_class"][1] is None
    back = BagCalibration.load(path)
    assert math.isnan(back.metrics["ensemble"].pop("ece_after"))
    cal.metrics["ensemble"].pop("ece_after")
    assert back == cal
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temporary left behind


def _set(raw: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        raw = raw[key]
    if value is KeyError:
        del raw[last]
    else:
        raw[last] = value


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("format", "taxotrain-calibration/2", "format"),
    ("members", KeyError, "members"),
    ("thresholds.vit.source", KeyError, "source"),
    ("members.vit", 0.0, "members.vit"),
    ("members.vit", -1, "members.vit"),
    ("members.vit", "1.0", "members.vit"),
    ("ensemble", math.nan, "ensemble"),
    ("thresholds.resnet.per_class", [0.9, 0.95], "one entry per class"),
    ("thresholds.resnet.per_class", [0.9, "high", 0.9], "per_class"),
    ("thresholds.ensemble.support", [1, 2], "one entry per class"),
    ("thresholds.convnext", {}, "convnext"),
    ("n", "67", "n"),
    ("metrics", [], "metrics"),
])
def test_a_malformed_calibration_file_is_a_config_error_naming_it(tmp_path: Path, key, value, reason):
    raw = bag_calibration().to_dict()
    _set(raw, key, value)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=reason) as err:
        BagCalibration.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", "null", "\xff"])
def test_a_file_that_is_not_a_calibration_object_is_a_config_error(tmp_path: Path, text):
    path = tmp_path / "calibration.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        BagCalibration.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="missing.json"):
        BagCalibration.load(tmp_path / "missing.json")


def test_the_clamp_is_the_one_of_ensemble_py():
    from trainer.inference import calibration
    assert calibration.EPS == ensemble.EPS


# ------------------------------------------------------------------ the figure


def test_precision_coverage_png_writes_a_png(tmp_path: Path):
    _, probs, labels = calibrated_set(9, 2000)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    coverage, precision, _ = precision_coverage_curve(conf, correct)
    curves = {"resnet": (coverage, precision), "ensemble": (coverage, np.minimum(precision + 0.01, 1))}
    points = {"resnet": (0.4, 0.95), "ensemble": (0.5, math.nan)}  # NaN: nothing accepted
    path = precision_coverage_png(tmp_path / "pc.png", curves, points, [0.9, 0.95], "ensemble")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
