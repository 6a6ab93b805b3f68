"""Rare classes (issue 16): loss weights and logit adjustment from the training counts, the warnings for
classes that a split never measures, and evaluate's report by class frequency."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import run_build, save_image
from PIL import Image
from test_bag import bag_config
from test_train import config, train
from torch import nn
from torch.nn import functional as F
from train_fixtures import CLASSES, final_state, write_shardset

from shards.config import ImageFolderSource, SplitConfig
from shards.info import InfoError, read_info
from trainer import imbalance, resume
from trainer.checkpoint import CheckpointError
from trainer.inference import frequency
from trainer.inference.config import EvalData, EvaluateConfig
from trainer.inference.evaluate import run as run_evaluate
from trainer.jobs.bag import train_bag
from trainer.loop import Trainer
from trainer.runtime.distributed import DistEnv
from trainer.runtime.exits import ConfigError

ONE = DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "single")
RUN = ["trainer.max_steps=3", "loader.workers=0", "schedule.warmup_epochs=0"]

# ---------------------------------------------------------------- the math


def test_balanced_weights_by_hand_and_zero_for_an_unseen_class():
    w = imbalance.class_weights([6, 3, 1, 0], "balanced")
    # n / (C n_c) with n = 10 and C = 3 classes that have samples (sklearn's "balanced")
    assert w.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0.0])
    assert float((torch.tensor([6.0, 3, 1, 0]) * w).sum()) / 10 == pytest.approx(1.0)  # mean over samples
    assert imbalance.class_weights([6, 3, 1], "none") is None


def test_sqrt_weights_by_hand_have_a_mean_of_one_over_the_samples():
    w = imbalance.class_weights([6, 3, 1], "sqrt")
    # sqrt(n / (C n_c)) rescaled to a sample mean of 1 is n / (sqrt(n_c) * sum_j sqrt(n_j))
    total = math.sqrt(6) + math.sqrt(3) + 1
    assert w.tolist() == pytest.approx([10 / (math.sqrt(n) * total) for n in (6, 3, 1)])
    assert float((torch.tensor([6.0, 3, 1]) * w).sum()) == pytest.approx(10.0)


def test_logit_adjustment_is_the_cross_entropy_of_shifted_logits():
    counts, tau = [50, 30, 15, 5], 1.5
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3] * 2)
    loss = imbalance.criterion(counts, "none", tau, 0.0, "test")
    prior = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    expected = F.cross_entropy(logits + tau * prior.log(), labels)
    assert loss(logits, labels) == pytest.approx(float(expected), rel=1e-6)
    # with weights too: the plain mean over the batch of w_y times each sample's loss
    both = imbalance.criterion(counts, "balanced", tau, 0.1, "test")
    w = imbalance.class_weights(counts, "balanced")
    each = F.cross_entropy(logits + tau * prior.log(), labels, reduction="none", label_smoothing=0.1)
    assert both(logits, labels) == pytest.approx(float((w[labels] * each).mean()), rel=1e-6)


def test_no_weighting_and_tau_0_are_exactly_the_old_loss():
    logits, labels = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    loss = imbalance.criterion([10, 5, 1], "none", 0.0, 0.1, "test")
    assert type(loss) is nn.CrossEntropyLoss and loss.label_smoothing == 0.1
    assert torch.equal(loss(logits, labels), nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels))
    assert imbalance.criterion(None, "none", 0.0, 0.0, "no counts needed") is not None


def test_an_unseen_class_keeps_a_finite_prior_and_is_warned_about():
    assert torch.isfinite(imbalance.log_prior([5, 0, 3])).all()
    text = imbalance.unseen_warning(["a", "b", "c"], [5, 0, 3], "balanced", 0.0)
    assert text is not None and "b" in text and "weight 0" in text
    assert imbalance.unseen_warning(["a", "b"], [5, 0], "none", 0.0) is None  # the plain loss uses no counts


def test_counts_are_needed_and_the_setting_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.logit_adjust_tau=1.0 needs .*class_counts.*somewhere"):
        imbalance.criterion(None, "none", 1.0, 0.0, "somewhere")
    with pytest.raises(ConfigError, match="optim.class_weight=sqrt"):
        imbalance.criterion(None, "sqrt", 0.0, 0.0, "somewhere")


def test_malformed_class_counts_in_the_manifest_name_the_split(tmp_path):
    root = write_shardset(tmp_path / "s", {"train": [6]})
    info = json.loads((root / "_info.json").read_text())
    assert read_info(root).splits["train"].class_counts == (2, 2, 2)
    info["splits"]["train"]["class_counts"] = [3, 3]
    (root / "_info.json").write_text(json.dumps(info))
    with pytest.raises(InfoError, match="'train': 2 'class_counts' for 3 classes"):
        read_info(root)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # serial % 3 labels: train 0..13 (ant 5, bee 5, cat 4), val 14..15 (cat, ant): no bee in validation
    return write_shardset(tmp_path_factory.mktemp("imbalance"), {"train": [10, 4], "val": [2]})


@pytest.mark.parametrize("setting", ["optim.class_weight=balanced", "optim.class_weight=sqrt",
                                     "optim.logit_adjust_tau=1.0"])
def test_a_tiny_run_trains_with_each_setting(shards, tmp_path, setting):
    assert train(config(shards, tmp_path / "r", *RUN, setting)) == 0
    key, value = setting.split("=")
    assert str(final_state(tmp_path / "r")["config"]["optim"][key.split(".")[1]]) == value


def test_the_trainer_builds_the_loss_from_the_train_counts(shards, tmp_path):
    trainer = Trainer(config(shards, tmp_path / "r", *RUN, "optim.class_weight=balanced",
                             "optim.logit_adjust_tau=0.5"), ONE)
    try:
        assert trainer.train_counts == (5, 5, 4)
        assert trainer.criterion.weights.tolist() == pytest.approx([14 / 15, 14 / 15, 14 / 12])
        assert trainer.criterion.shift.tolist() == pytest.approx([0.5 * math.log(n / 14) for n in (5, 5, 4)])
    finally:
        trainer.close()


def test_training_warns_once_about_classes_without_validation_samples(shards, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="trainer.loop")
    assert train(config(shards, tmp_path / "r", *RUN)) == 0
    lines = [r.getMessage() for r in caplog.records if "0 samples in the validation split" in r.getMessage()]
    assert lines == ["1 of 3 class(es) have 0 samples in the validation split 'val', so their accuracy is "
                     "never measured: 'bee' (5 train)"]


def test_a_changed_setting_is_refused_on_resume(shards, tmp_path):
    assert resume.policy("optim.class_weight") == resume.policy("optim.logit_adjust_tau") == resume.FIXED
    assert train(config(shards, tmp_path / "r", *RUN)) == 0
    with pytest.raises(CheckpointError, match="optim.class_weight: 'none' -> 'balanced'"):
        Trainer(config(shards, tmp_path / "r", *RUN, "optim.class_weight=balanced"), ONE)


def test_shards_build_warns_with_counts_when_a_class_misses_val_and_test(tmp_path, capsys):
    root = tmp_path / "images"
    for name, n in (("common", 30), ("rare", 3)):
        for i in range(n):
            save_image(root / name / f"{i}.png", size=(8, 8), seed=100 * n + i)
    run_build(tmp_path / "s", ImageFolderSource(root=str(root)), split=SplitConfig(val=0.1, test=0.1))
    out = capsys.readouterr().out
    assert "warning: class 'rare' has 3 image(s), 0 in val, 0 in test" in out
    assert "class 'common'" not in out


# ---------------------------------------------------------------- evaluate by class frequency


def hand_report(excluded: list[str] | None = None) -> dict:
    nan = math.nan
    support = [4, 2, 10, 0]
    return {"classes": ["a", "b", "c", "d"], "excluded_classes": excluded or [],
            "per_class": [{"support": s} for s in support],
            "members": {"m": {"per_class_recall": [0.5, 1.0, 0.9, nan]}},
            "ensemble": {"per_class_recall": [0.75, 0.5, 1.0, nan]}}


def test_frequency_bins_on_a_hand_made_report():
    section = frequency.section(hand_report(), [5, 30, 150, 0], "split 'train'", [20, 100])
    assert [(b["name"], b["range"], b["classes"], b["samples"]) for b in section["bins"]] == [
        ("rare", "< 20", 2, 4), ("medium", "20..99", 1, 2), ("common", ">= 100", 1, 10)]
    rare, medium, common = section["models"]["ensemble"]
    assert rare == {"top1": 0.75, "mean_recall": 0.75}  # class d has no test samples: left out of both
    assert medium == {"top1": 0.5, "mean_recall": 0.5} and common["top1"] == 1.0
    assert section["models"]["m"][2]["top1"] == pytest.approx(0.9)
    # an excluded class leaves its bin; a bin with no samples left has no scores
    without = frequency.section(hand_report(["a"]), [5, 30, 150, 0], "s", [20, 100])
    assert without["bins"][0]["classes"] == 1 and math.isnan(without["models"]["m"][0]["top1"])
    text = "\n".join(frequency.markdown(section))
    assert "| model | rare top-1 | rare recall |" in text and "| **ensemble** | 0.7500 | 0.7500 |" in text
    assert frequency.section(hand_report(), None, "why", [20]) == {"skipped": "why"}


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    root = tmp_path_factory.mktemp("frequency")
    shards = write_shardset(root / "s", {"train": [40, 40, 40], "test": [20, 13]})
    assert train_bag(bag_config(shards, root / "bag", "bag.members=2")) == 0
    return root, shards, root / "bag"


def test_evaluate_reports_by_training_frequency_with_a_plot(bag, tmp_path):
    _, shards, bag_dir = bag
    cfg = EvaluateConfig(bag=str(bag_dir), data=EvalData(str(shards), "test"), workers=0,
                         frequency_bins=[40, 41], out=str(tmp_path))
    assert run_evaluate(cfg) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    section = report["frequency"]
    assert section["train_counts"] == [40, 40, 40] and section["edges"] == [40, 41]
    assert [b["classes"] for b in section["bins"]] == [0, 3, 0]  # each class has 40 training samples
    assert section["bins"][1]["samples"] == 33
    assert set(section["models"]) == {"member-00", "member-01", "ensemble"}
    assert section["models"]["ensemble"][1]["top1"] == pytest.approx(report["ensemble"]["top1"])
    assert section["models"]["member-01"][1]["mean_recall"] == pytest.approx(
        report["members"]["member-01"]["balanced_acc"])
    with Image.open(tmp_path / "recall_vs_count.png") as im:
        assert im.format == "PNG" and im.width > 300
    assert "## By training frequency" in (tmp_path / "report.md").read_text()


def test_evaluate_skips_the_section_without_training_counts(bag, tmp_path):
    root, _, bag_dir = bag
    shards = write_shardset(root / "no-counts", {"train": [40, 40, 40], "test": [20, 13]})  # the same set
    info = json.loads((shards / "_info.json").read_text())
    del info["splits"]["train"]["class_counts"]
    (shards / "_info.json").write_text(json.dumps(info))
    cfg = EvaluateConfig(bag=str(bag_dir), data=EvalData(str(shards), "test"), workers=0, out=str(tmp_path))
    assert run_evaluate(cfg) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert "records no class_counts" in report["frequency"]["skipped"]
    assert not (tmp_path / "recall_vs_count.png").exists()
    assert "By training frequency: skipped" in (tmp_path / "report.md").read_text()
    assert CLASSES == tuple(report["classes"])
