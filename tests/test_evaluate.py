"""launch.evaluate's report: confusion counts, per-class table, test-time augmentation, plots, W&B."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from PIL import Image
from test_bag import bag_config
from train_fixtures import CLASSES, write_shardset

from trainer.data.transforms import AugmentConfig
from trainer.inference.config import EvalData, EvaluateConfig
from trainer.inference.confusion import Confusion
from trainer.inference.evaluate import run as run_evaluate
from trainer.inference.members import input_transform, load_bag, probabilities, views
from trainer.jobs.bag import train_bag
from trainer.metrics import MetricState
from trainer.runtime.exits import ConfigError


def test_confusion_counts_rows_and_most_confused_by_hand():
    c = Confusion(4)
    # true:  0 0 0 1 1 2 2 2 2   predicted: 0 1 1 1 0 2 2 1 2   (class 3 never seen nor predicted)
    true = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 1, 2])
    c.update(torch.nn.functional.one_hot(pred, 4).float(), true)
    rows = c.rows()
    assert [(r.support, r.predicted, r.correct) for r in rows] == [(3, 2, 1), (2, 4, 1), (4, 3, 3), (0, 0, 0)]
    assert rows[0].precision == pytest.approx(1 / 2) and rows[0].recall == pytest.approx(1 / 3)
    assert rows[0].f1 == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert rows[1].precision == pytest.approx(1 / 4) and rows[2].recall == pytest.approx(3 / 4)
    assert math.isnan(rows[3].precision) and math.isnan(rows[3].recall) and math.isnan(rows[3].f1)
    assert c.most_confused(2) == [(0, 1, 2), (1, 0, 1)]
    assert c.matrix([0, 1]).tolist() == [[1, 2], [1, 1]]
    assert c.shown_classes(2) == [0, 1]  # class 0 and 1 take part in 4 and 5 errors, class 2 in 1
    assert c.shown_classes(10) == [0, 1, 2, 3]


def test_ties_in_the_prediction_go_to_the_lower_class_as_in_metrics():
    c = Confusion(3)
    c.update(torch.tensor([[0.2, 0.4, 0.4]]), torch.tensor([2]))
    assert c.pairs == {(2, 1): 1}


def test_macro_top5_averages_per_class_top5_recall():
    state = MetricState(6)
    # class 0: true class ranked 1st and 6th (top-5 recall 0.5); class 1: ranked 2nd (recall 1)
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 6, 5, 4, 3, 2], [7.0, 6, 5, 4, 3, 2]])
    state.update(logits, torch.tensor([0, 0, 1]))
    values = state.compute()
    assert values["per_class_top5"][:2] == [0.5, 1.0]
    assert values["macro_top5"] == pytest.approx(0.75)
    assert values["top5"] == pytest.approx(2 / 3)


def test_tta_views_and_averaged_probabilities():
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    assert len(views(images, "none", 16)) == 1
    flipped = views(images, "hflip", 16)
    assert torch.equal(flipped[1], images.flip(-1))
    crops = views(images, "tencrop", 16)
    assert len(crops) == 10 and all(v.shape == (2, 3, 16, 16) for v in crops)
    assert torch.equal(crops[0], images[..., :16, :16])  # top-left corner first, as torchvision's
    assert torch.equal(crops[5], crops[1].flip(-1))  # the mirror's top-left is the top-right mirrored
    # multi-crop keeps the resized centre square; the other modes centre-crop
    aug = AugmentConfig(crop_size=16, eval_crop_ratio=0.8)
    assert input_transform(aug, "fivecrop")(images[0]).shape == (3, 20, 20)
    assert input_transform(aug, "hflip")(images[0]).shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="tta"):
        views(images, "sevencrop", 16)


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    shards = write_shardset(root / "s", {"train": [40, 40, 40], "test": [20, 13]})
    assert train_bag(bag_config(shards, root / "bag", "bag.members=2")) == 0
    return shards, root / "bag"


def test_hflip_probabilities_are_the_mean_over_the_two_views(bag):
    _, bag_dir = bag
    member = load_bag(bag_dir, ["member-00"], "latest", torch.device("cpu"))[0]
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    plain = probabilities(member, images, "none")
    mirrored = probabilities(member, images.flip(-1), "none")
    assert torch.allclose(probabilities(member, images, "hflip"), (plain + mirrored) / 2)


def test_report_files_per_class_table_and_plots(bag, tmp_path):
    shards, bag_dir = bag
    cfg = EvaluateConfig(bag=str(bag_dir), data=EvalData(str(shards), "test"), workers=1, batch_size=8,
                         tta="hflip", out=str(tmp_path))
    assert run_evaluate(cfg) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tta"] == "hflip" and report["ensemble"]["n"] == 33
    rows = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [r["class"] for r in rows] == list(CLASSES)
    assert sum(int(r["support"]) for r in rows) == sum(int(r["predicted"]) for r in rows) == 33
    assert sum(int(r["correct"]) for r in rows) == round(report["ensemble"]["top1"] * 33)
    for r, recall in zip(rows, report["ensemble"]["per_class_recall"]):
        assert float(r["recall"]) == pytest.approx(recall, abs=1e-5)
        assert float(r["recall.member-01"]) == pytest.approx(
            report["members"]["member-01"]["per_class_recall"][CLASSES.index(r["class"])], abs=1e-5)
    counts = report["confusion"]["counts"]
    assert report["confusion"]["classes"] == list(CLASSES) and sum(map(sum, counts)) == 33
    assert sum(c["count"] for c in report["most_confused"]) == 33 - sum(counts[i][i] for i in range(3))
    for name in ("confusion.png", "reliability.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 300
    md = (tmp_path / "report.md").read_text()
    assert "macro_top5" in md and "TTA hflip" in md and "per_class.csv" in md


def test_excluded_classes_leave_the_summary_and_unknown_ones_are_named(bag, tmp_path):
    shards, bag_dir = bag
    full = EvaluateConfig(bag=str(bag_dir), data=EvalData(str(shards), "test"), workers=0, plots=False,
                          out=str(tmp_path / "all"))
    assert run_evaluate(full) == 0
    without = EvaluateConfig(bag=str(bag_dir), data=EvalData(str(shards), "test"), workers=0, plots=False,
                             exclude_classes=["bee"], out=str(tmp_path / "nobee"))
    assert run_evaluate(without) == 0
    a = json.loads((tmp_path / "all" / "report.json").read_text())
    b = json.loads((tmp_path / "nobee" / "report.json").read_text())
    bees = a["per_class"][1]["support"]
    assert bees > 0 and b["ensemble"]["n"] == a["ensemble"]["n"] - bees
    assert b["per_class"][1]["support"] == 0 and b["per_class"][1]["excluded"] is True
    assert not (tmp_path / "nobee" / "confusion.png").exists()
    with pytest.raises(ConfigError, match="exclude_classes.*wasp"):
        run_evaluate(EvaluateConfig(bag=str(bag_dir), data=EvalData(str(shards), "test"),
                                    exclude_classes=["wasp"], out=str(tmp_path / "x")))
    with pytest.raises(ValidationError, match="tta"):  # a typed choice: refused while composing
        OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {"tta": "mirror"})


def test_the_report_goes_to_wandb_offline_with_its_figures(bag, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    shards, bag_dir = bag
    cfg = EvaluateConfig(bag=str(bag_dir), data=EvalData(str(shards), "test"), workers=0, out=str(tmp_path))
    cfg.logger.mode = "offline"
    assert run_evaluate(cfg) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = {p.name.split("_")[0] for p in (runs[0] / "files" / "media").rglob("*") if p.is_file()}
    assert {"confusion", "reliability", "summary", "per"} <= media
    summary = json.loads((tmp_path / "summary.json").read_text())  # what went to the W&B summary
    report = json.loads((tmp_path / "report.json").read_text())
    assert summary["ensemble/top1"] == pytest.approx(report["ensemble"]["top1"])
    assert summary["member-01/nll"] == pytest.approx(report["members"]["member-01"]["nll"])
