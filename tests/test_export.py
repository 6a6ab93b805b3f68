"""Export to safetensors + JSON: same logits as the checkpoint, no pickle on load, tampering caught."""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors import safe_open
from test_bag import bag_config
from train_fixtures import CLASSES, write_shardset

from trainer.data.transforms import eval_transform
from trainer.inference.config import ExportConfig
from trainer.inference.export import (
    ExportError,
    export_bag,
    load_exported,
    load_exported_bag,
    preprocess,
    run,
)
from trainer.inference.members import augment_config, load_member
from trainer.jobs.bag import train_bag
from trainer.runtime.cli import typed
from trainer.runtime.exits import ConfigError

REPO = Path(__file__).resolve().parents[1]
MEMBERS = ("member-00", "member-01")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(bag, its default export directory): a bag of two trained for 3 steps at 16 px, exported once."""
    root = tmp_path_factory.mktemp("export")
    shards = write_shardset(root / "s", {"train": [40, 40, 40]})
    bag = root / "bag"
    assert train_bag(bag_config(shards, bag, "bag.members=2")) == 0
    out, metas = export_bag(bag, [], "best")
    assert out == bag / "export" and [m["name"] for m in metas] == list(MEMBERS)
    return bag, out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images() -> torch.Tensor:
    """A fixed uint8 batch, not square and larger than the crop, so resize and crop both act."""
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (4, 3, 23, 19), dtype=torch.uint8, generator=generator)


def test_export_writes_weights_metadata_and_bag_record(exported):
    bag, out = exported
    assert sorted(p.name for p in out.iterdir()) == \
        ["bag.json", "member-00.json", "member-00.safetensors", "member-01.json", "member-01.safetensors"]
    for name in MEMBERS:
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["format"] == "taxotrain-export/1" and meta["model"] == "resnet18"
        assert meta["classes"] == list(CLASSES) and meta["num_classes"] == 3 and meta["step"] == 3
        assert meta["input"] == {"crop_size": 16, "eval_crop_ratio": 0.875, "resize": 18,
                                 "interpolation": "bilinear", "antialias": True, "channel_order": "RGB",
                                 "layout": "NCHW", "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225],
                                 "scale": "divide uint8 values by 255, then subtract mean and divide by std"}
        assert meta["weights"]["sha256"] == sha256(out / f"{name}.safetensors")
        # no best.pt without a validation split: the newest step checkpoint is the source
        source = Path(meta["source"]["checkpoint"])
        assert source == (bag / name / "checkpoints" / "step-000000003.pt").resolve()
        assert meta["source"]["sha256"] == sha256(source)
        assert meta["software"]["safetensors"] == safetensors.__version__ and meta["software"]["torch"]
        with safe_open(out / f"{name}.safetensors", "pt") as f:
            header = f.metadata()
            assert "fc.weight" in f.keys() and not any(k.startswith("module.") for k in f.keys())
        assert header == {"format": "pt", "taxotrain_format": "taxotrain-export/1", "model": "resnet18"}
    record = json.loads((out / "bag.json").read_text())
    assert record["format"] == "taxotrain-export-bag/1" and record["combine"] == "mean"
    assert [(m["name"], m["weights"], m["meta"]) for m in record["members"]] == \
        [(n, f"{n}.safetensors", f"{n}.json") for n in MEMBERS]


def test_exported_models_give_the_checkpoints_logits_without_any_unpickling(exported, monkeypatch):
    bag, out = exported
    expected = []
    for name in MEMBERS:
        member = load_member(name, bag / name, "best", torch.device("cpu"))
        with torch.no_grad():
            expected.append(member.net(member.normalize(eval_transform(augment_config(member))(images()))))
    assert not torch.equal(expected[0], expected[1])  # two different members, or the check proves little

    def refuse(*_args, **_kwargs):
        raise AssertionError("unpickling while loading an export")

    for target, attr in [(torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(target, attr, refuse)
    with pytest.raises(AssertionError, match="unpickling"):
        torch.load(bag / "member-00" / "checkpoints" / "step-000000003.pt")  # the trap is armed
    loaded = load_exported_bag(out)
    assert [meta["name"] for _, meta in loaded] == list(MEMBERS)
    for (net, meta), reference in zip(loaded, expected):
        assert not net.training
        transform, normalize = preprocess(meta)
        with torch.no_grad():
            logits = net(normalize(transform(images())))
        assert logits.shape == (4, 3) and torch.equal(logits, reference)
    net, meta = load_exported(out / "member-01.safetensors")  # the weights' path works as well as the JSON's
    assert meta["name"] == "member-01" and torch.equal(net.fc.weight, loaded[1][0].fc.weight)


def test_tampered_missing_or_misfitting_files_fail_naming_the_file(exported, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(exported[1], copy)
    weights, meta_path = copy / "member-00.safetensors", copy / "member-00.json"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=re.escape(str(weights)) + ".*sha256"):
        load_exported(meta_path)
    with pytest.raises(ExportError, match=re.escape(str(weights))):
        load_exported_bag(copy)

    (copy / "member-01.safetensors").unlink()
    with pytest.raises(ExportError, match=re.escape(str(copy / "member-01.safetensors"))):
        load_exported(copy / "member-01.json")

    # weights with a truncated classifier, re-hashed so that only the shape check can catch them
    state = safetensors.torch.load_file(exported[1] / "member-00.safetensors")
    state["fc.weight"] = state["fc.weight"][:2].contiguous()
    safetensors.torch.save_file(state, weights)
    meta = json.loads(meta_path.read_text())
    meta["weights"]["sha256"] = sha256(weights)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=re.escape(str(weights)) + r".*other shapes \['fc.weight'\]"):
        load_exported(meta_path)
    meta["model"] = "resnet34"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"does not fit ResNet: missing \['layer1\.2"):
        load_exported(meta_path)
    meta_path.write_text("{not json")
    with pytest.raises(ExportError, match=re.escape(str(meta_path)) + ".*unreadable"):
        load_exported(meta_path)


def test_a_single_run_directory_exports_and_reexport_overwrites(exported, tmp_path):
    bag, out = exported
    alone = tmp_path / "alone"
    for _ in range(2):
        assert run(ExportConfig(bag=str(bag / "member-01"), out=str(alone))) == 0
    assert sorted(p.name for p in alone.iterdir()) == ["bag.json", "member-01.json", "member-01.safetensors"]
    # the same checkpoint gives the same bytes, whether exported alone or with its bag
    assert sha256(alone / "member-01.safetensors") == sha256(out / "member-01.safetensors")
    ((net, meta),) = load_exported_bag(alone)
    assert meta["name"] == "member-01" and meta["source"]["requested"] == "best"
    subset = tmp_path / "subset"
    assert run(ExportConfig(bag=str(bag), members=["member-00"], checkpoint="latest", out=str(subset))) == 0
    assert [m["name"] for m in json.loads((subset / "bag.json").read_text())["members"]] == ["member-00"]


def test_bad_input_is_a_config_error_and_exit_code_2(exported, tmp_path):
    bag, _ = exported
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "-m", "launch.export", f"bag={missing}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"bag: {missing} is not a directory" in proc.stdout + proc.stderr
    empty = tmp_path / "run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"no checkpoint in {re.escape(str(empty / 'checkpoints'))}"):
        run(ExportConfig(bag=str(empty), out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="member-07"):
        run(ExportConfig(bag=str(bag), members=["member-07"], out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="checkpoint: .*newest"):
        typed(ExportConfig, {"bag": str(bag), "checkpoint": "newest"})
