"""Combining members, NLL and calibration against hand-computed values; launch.evaluate end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_bag import bag_config
from train_fixtures import write_shardset

from trainer.inference.config import EvalData, EvaluateConfig
from trainer.inference.ensemble import Calibration, ProbabilityMetrics, combine
from trainer.inference.evaluate import run as run_evaluate
from trainer.jobs.bag import train_bag
from trainer.runtime.exits import ConfigError

P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]], dtype=torch.float64)
Y = torch.tensor([0, 2, 2, 1])


@pytest.mark.parametrize("mode", ["mean", "geometric"])
def test_an_ensemble_of_identical_members_is_that_member_and_sums_to_one(mode):
    assert torch.allclose(combine([P, P, P], mode), P)
    other = torch.softmax(torch.randn(4, 3, dtype=torch.float64), dim=1)
    assert torch.allclose(combine([P, other], mode).sum(1), torch.ones(4, dtype=torch.float64))


def test_mean_and_geometric_combination_by_hand():
    a = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    b = torch.tensor([[0.2, 0.8]], dtype=torch.float64)
    assert combine([a, b], "mean").tolist() == [[0.5, 0.5]]
    c = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    g = math.sqrt(0.8 * 0.9), math.sqrt(0.2 * 0.1)
    assert combine([a, c], "geometric")[0].tolist() == pytest.approx([g[0] / sum(g), g[1] / sum(g)])


def test_probability_metrics_against_hand_computed_values():
    m = ProbabilityMetrics(3)
    m.update(P, Y)
    values = m.compute()
    true_probs = (0.7, 0.3, 0.5, 0.4)
    assert values["nll"] == pytest.approx(-sum(math.log(p) for p in true_probs) / 4)
    # argmax with ties to the lower index: 0, 1, 2, 0 -> hits on samples 0 and 2
    assert values["top1"] == 0.5 and values["n"] == 4
    # ranks of the true class: 1, 2, 1, 2 (tie 0.4/0.4 breaks to class 0 first)
    assert values["mrr"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    # recall per class: 0 -> 1/1, 1 -> 0/1, 2 -> 1/2
    assert values["balanced_acc"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_ece_on_known_cases():
    calibrated = Calibration(bins=10)
    probs = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    calibrated.update(probs, torch.tensor([0] * 8 + [1] * 2))
    assert calibrated.ece() == pytest.approx(0.0)
    overconfident = Calibration(bins=10)
    sure = torch.tensor([[0.9, 0.1]] * 10, dtype=torch.float64)
    overconfident.update(sure, torch.tensor([0] * 5 + [1] * 5))
    assert overconfident.ece() == pytest.approx(0.4)
    two_bins = Calibration(bins=10)  # 0.9 (all right) and 0.6 (half right): (10*0.1 + 10*0.1) / 20
    two_bins.update(torch.tensor([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 10, dtype=torch.float64),
                    torch.tensor([0] * 10 + [0] * 5 + [1] * 5))
    assert two_bins.ece() == pytest.approx(0.1)


def test_evaluate_a_bag_of_two_writes_member_and_ensemble_reports(tmp_path):
    shards = write_shardset(tmp_path / "s", {"train": [40, 40, 40], "test": [17, 9]})
    bag = tmp_path / "bag"
    assert train_bag(bag_config(shards, bag, "bag.members=2")) == 0
    cfg = EvaluateConfig(bag=str(bag), data=EvalData(str(shards), "test"), workers=2, batch_size=5)
    assert run_evaluate(cfg) == 0
    report = json.loads((bag / "report.json").read_text())
    assert set(report["members"]) == {"member-00", "member-01"}
    for values in [*report["members"].values(), report["ensemble"]]:
        assert values["n"] == 26 and 0 <= values["ece"] <= 1 and values["nll"] > 0
        assert {"top1", "top5", "mrr", "balanced_acc", "per_class_recall"} <= set(values)
    assert "**ensemble**" in (bag / "report.md").read_text()
    alone = EvaluateConfig(bag=str(bag), data=EvalData(str(shards), "test"), members=["member-01"],
                           workers=0, out=str(tmp_path / "one"))
    assert run_evaluate(alone) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert one["ensemble"]["top1"] == one["members"]["member-01"]["top1"]  # a bag of one is its member
    assert one["ensemble"]["nll"] == pytest.approx(one["members"]["member-01"]["nll"])
    with pytest.raises(ConfigError, match="member-07"):
        run_evaluate(EvaluateConfig(bag=str(bag), data=EvalData(str(shards), "test"), members=["member-07"]))
    with pytest.raises(ConfigError, match="neither a bag"):
        run_evaluate(EvaluateConfig(bag=str(tmp_path), data=EvalData(str(shards), "test")))
    assert Path(bag / "report.json").exists()
