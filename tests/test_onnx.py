"""ONNX export (issue 19): each member and the whole calibrated ensemble as graphs that onnxruntime runs on
the CPU, giving PyTorch's probabilities (the Scorer's, for the ensemble) within TOLERANCE, at any batch."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf
from test_bag import bag_config
from train_fixtures import CLASSES, write_shardset

from trainer.data.transforms import eval_transform
from trainer.inference.calibration import BagCalibration, Thresholds
from trainer.inference.config import ExportConfig
from trainer.inference.export import ExportError, export_bag, export_onnx_ensemble, load_exported
from trainer.inference.members import Member, augment_config, load_bag, probabilities
from trainer.inference.scoring import Scorer, load_calibration
from trainer.runtime.cli import typed
from trainer.runtime.exits import ConfigError

MEMBERS = ("member-00", "member-01")
TEMPERATURES = {"member-00": 1.7, "member-01": 0.6}
ENSEMBLE_T = 1.4
# float32 graphs against the Scorer's float64 softmax: a probability may differ by this much at most
TOLERANCE = 1e-4


def write_calibration(bag: Path) -> None:
    th = Thresholds(0.95, 0.9, [0.8, 0.9, 0.95], ["class", "class", "global"], [5, 5, 1], 2)
    cal = BagCalibration(split="val", shards="/s", n=12, tta="none", combine="mean",
                         members=dict(TEMPERATURES), ensemble=ENSEMBLE_T, thresholds={"ensemble": th},
                         metrics={})
    cal.save(bag / "calibration.json")


@pytest.fixture(scope="module")
def onnx_bag(tmp_path_factory) -> tuple[Path, Path]:
    """(bag, export): two members trained 3 steps at 16 px, calibrated, exported as ONNX with the ensemble."""
    from trainer.jobs.bag import train_bag

    root = tmp_path_factory.mktemp("onnx")
    bag = root / "bag"
    shards = write_shardset(root / "s", {"train": [40, 40, 40]})
    assert train_bag(bag_config(shards, bag, "bag.members=2")) == 0
    write_calibration(bag)
    out, metas = export_bag(bag, [], "best", root / "export", "auto", fmt="onnx", ensemble=True)
    assert [m["name"] for m in metas] == list(MEMBERS)
    return bag, out


@pytest.fixture(scope="module")
def members(onnx_bag) -> list[Member]:
    return load_bag(onnx_bag[0], [], "best", torch.device("cpu"))


def batch(member: Member, n: int, seed: int = 3) -> torch.Tensor:
    """n uint8 images, not square and larger than the crop, prepared as the export's `input` says."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, 3, 23, 19), dtype=torch.uint8, generator=gen)
    return eval_transform(augment_config(member))(raw)


def run(path: Path, images: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_onnx_files_and_json_describe_inputs_outputs_and_preprocessing(onnx_bag):
    bag, out = onnx_bag
    assert sorted(p.name for p in out.iterdir()) == ["bag.json", "ensemble.onnx", "member-00.json",
                                                     "member-00.onnx", "member-01.json", "member-01.onnx"]
    for name in MEMBERS:
        meta = json.loads((out / f"{name}.json").read_text())
        graph = meta["onnx"]
        assert "weights" not in meta and graph["file"] == f"{name}.onnx"
        assert graph["sha256"] == sha256(out / graph["file"]) and graph["temperature"] == TEMPERATURES[name]
        assert graph["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["batch", 3, 16, 16]}]
        assert [(o["name"], o["dtype"], o["shape"][1]) for o in graph["outputs"]] == \
            [("logits", "float32", 3), ("probabilities", "float32", 3)]
        assert isinstance(graph["opset"], int) and "uint8" in graph["expects"]
        assert meta["input"]["resize"] == 18 and meta["input"]["crop_size"] == 16
        assert meta["input"]["mean"] == [0.485, 0.456, 0.406] and meta["input"]["channel_order"] == "RGB"
    record = json.loads((out / "bag.json").read_text())
    assert [(m["name"], m["onnx"]) for m in record["members"]] == [(n, f"{n}.onnx") for n in MEMBERS]
    whole = record["ensemble"]
    assert whole["file"] == "ensemble.onnx" and whole["sha256"] == sha256(out / "ensemble.onnx")
    assert whole["temperatures"] == TEMPERATURES and whole["ensemble_temperature"] == ENSEMBLE_T
    assert whole["input"]["resize"] == 18 and "mean" not in whole["input"]  # each member normalises inside
    assert [o["name"] for o in whole["outputs"]] == ["probabilities"] and record["classes"] == list(CLASSES)
    with pytest.raises(ExportError, match=re.escape(str(out / "member-00.json")) + ".*onnxruntime"):
        load_exported(out / "member-00.json")


@pytest.mark.parametrize("n", [1, 5])
def test_onnxruntime_gives_the_scorers_probabilities_within_tolerance(onnx_bag, members, n):
    bag, out = onnx_bag
    images = batch(members[0], n)
    scorer = Scorer(members, "none", "mean", load_calibration(bag, "auto", members, "none", "mean"))
    assert scorer.ensemble_temperature == ENSEMBLE_T  # the whole bag's calibration applies
    expected = scorer(images)
    for member, reference in zip(members, expected.members):
        logits, probs = run(out / f"{member.name}.onnx", images)
        assert probs.shape == (n, 3) and np.abs(probs - reference.numpy()).max() <= TOLERANCE
        with torch.no_grad():
            torch_logits = member.net(member.normalize(images))
        assert np.abs(logits - torch_logits.numpy()).max() <= 1e-4
    (ensemble,) = run(out / "ensemble.onnx", images)
    assert ensemble.shape == (n, 3) and np.abs(ensemble - expected.ensemble.numpy()).max() <= TOLERANCE
    assert np.allclose(ensemble.sum(1), 1, atol=1e-5)
    # the temperatures matter: the raw mean differs from the calibrated ensemble by more than the tolerance
    assert np.abs(expected.raw_ensemble.numpy() - expected.ensemble.numpy()).max() > 10 * TOLERANCE


def test_calibration_none_exports_raw_softmax_and_no_ensemble(onnx_bag, members, tmp_path):
    bag, _ = onnx_bag
    out, (meta,) = export_bag(bag, ["member-01"], "best", tmp_path / "raw", "none", fmt="onnx")
    assert meta["onnx"]["temperature"] == 1.0 and not (out / "ensemble.onnx").exists()
    record = json.loads((out / "bag.json").read_text())
    assert "ensemble" not in record and record["calibration"] is None
    member = members[1]
    images = batch(member, 3, seed=7)
    _, probs = run(out / "member-01.onnx", images)
    assert np.abs(probs - probabilities(member, images, "none").numpy()).max() <= TOLERANCE


def test_bad_export_settings_are_config_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="ensemble: ensemble=true needs format=onnx"):
        typed(ExportConfig, {"bag": str(tmp_path), "ensemble": True})
    with pytest.raises(ConfigError, match="format"):
        typed(ExportConfig, {"bag": str(tmp_path), "format": "tflite"})
    assert typed(ExportConfig, {"bag": str(tmp_path), "format": "onnx", "ensemble": True}).ensemble is True
    crop = {"crop_size": 16, "resize": 18, "mean": [0.5] * 3, "std": [0.5] * 3}
    metas = [{"name": "a", "input": crop}, {"name": "b", "input": {**crop, "resize": 20}}]
    with pytest.raises(ConfigError, match=r"members \['b'\] prepare images differently"):
        export_onnx_ensemble(tmp_path, metas, [], 1.0)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_the_export_command_writes_onnx_and_logs_the_folder_as_an_artifact(onnx_bag, tmp_path, offline_wandb):
    """`taxotrain-export format=onnx logger.mode=offline`: the same files as export_bag, plus one W&B
    export run in the bag's group whose artifact holds them."""
    from test_wandb import of_kind, offline_runs, run_record

    from trainer.inference.export import run as export_command

    bag, _ = onnx_bag
    cfg = typed(ExportConfig, OmegaConf.from_dotlist([f"bag={bag}", f"out={tmp_path / 'e'}", "format=onnx",
                                                      "logger.mode=offline"]))
    assert export_command(cfg) == 0
    assert sorted(p.name for p in (tmp_path / "e").glob("*.onnx")) == ["member-00.onnx", "member-01.onnx"]
    (recs,) = offline_runs(bag).values()
    assert (run_record(recs).job_type, run_record(recs).run_group) == ("export", bag.name)
    assert of_kind(recs, "artifact")
