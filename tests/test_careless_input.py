"""Careless input outside the shards and images: malformed manifests, run_dir typos, uncatchable stop
signals, bag descriptions whose member names would leave the bag, and a test split whose bytes were
changed after the build. Each is refused with one line naming the file or key and the documented code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_bag import bag_config
from train_fixtures import write_shardset

from shards.verify import verify
from trainer.config import TrainConfig
from trainer.inference.config import EvalData, EvaluateConfig, ExportConfig
from trainer.inference.evaluate import run as run_evaluate
from trainer.jobs.bag import train_bag
from trainer.runtime.cli import typed
from trainer.runtime.exits import ConfigError, RunFailure

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bag(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("careless")
    shards = write_shardset(root / "s", {"train": [24, 24], "test": [12]})
    assert train_bag(bag_config(shards, root / "bag", "bag.members=1")) == 0
    return shards, root / "bag"


@pytest.mark.parametrize(("content", "said"), [
    (b"\xff\xfe{not utf-8", "unreadable manifest"),
    (b'{"classes": ["a"]}', "no 'splits' mapping"),
    (b"[1, 2, 3]", "no 'splits' mapping"),
    (b'{"classes": ["a"], "splits": {"train": {"shards": [{"filename": 3}]}}}', "malformed shard entry"),
])
def test_verify_reports_a_malformed_manifest_in_one_line(tmp_path, content, said):
    (tmp_path / "_info.json").write_bytes(content)
    problems = verify(tmp_path)
    assert len(problems) == 1 and said in problems[0] and "_info.json" in problems[0]
    done = subprocess.run([sys.executable, "-m", "shards.verify", f"dir={tmp_path}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr


def test_a_run_dir_below_a_file_is_named(tmp_path):
    shards = write_shardset(tmp_path / "s", {"train": [4], "val": [2]})
    (tmp_path / "notes").write_text("x")
    with pytest.raises(ConfigError, match=r"^run_dir: .*notes exists and is not a folder"):
        typed(TrainConfig, {"data": {"shards": str(shards)}, "run_dir": str(tmp_path / "notes" / "r")})


@pytest.mark.parametrize("name", ["SIGKILL", "SIGSTOP"])
def test_uncatchable_stop_signals_are_refused(tmp_path, name):
    shards = write_shardset(tmp_path / "s", {"train": [4], "val": [2]})
    with pytest.raises(ConfigError, match=rf"trainer\.signals: {name} cannot be caught"):
        typed(TrainConfig, {"data": {"shards": str(shards)}, "run_dir": str(tmp_path / "r"),
                            "trainer": {"signals": [name, "SIGUSR2"]}})


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "member 1"])
def test_member_names_that_would_leave_the_bag_are_refused(bag, tmp_path, name):
    _, bag_dir = bag
    forged = tmp_path / "forged"
    forged.mkdir()
    record = json.loads((bag_dir / "bag.json").read_text())
    record["members"][0]["name"] = name
    (forged / "bag.json").write_text(json.dumps(record))
    out = tmp_path / "sub" / "out"
    with pytest.raises(ConfigError, match="not a plain name"):
        from trainer.inference.export import run
        run(ExportConfig(bag=str(forged), out=str(out)))
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "sub" / "x.safetensors").exists()


def test_evaluate_checks_its_split_against_the_manifest(bag, tmp_path):
    """A flipped label byte in a test shard changed the metrics silently; now it stops evaluate (exit 1)."""
    shards, bag_dir = bag
    evaluated = shards.parent / "flipped"
    if not evaluated.exists():
        import shutil
        shutil.copytree(shards, evaluated)
    shard = next(evaluated.glob("test-*.tar"))
    blob = bytearray(shard.read_bytes())
    at = blob.index(b".cls") + 512 - blob.index(b".cls") % 512  # the data block after the first .cls header
    blob[at] = ord("1") if blob[at] != ord("1") else ord("2")
    shard.write_bytes(bytes(blob))
    cfg = EvaluateConfig(bag=str(bag_dir), data=EvalData(str(evaluated), "test"), workers=0,
                         out=str(tmp_path / "o"))
    with pytest.raises(RunFailure, match=rf"{shard.name}: sha256"):
        run_evaluate(cfg)
    assert not (tmp_path / "o" / "report.json").exists()
    off = EvaluateConfig(bag=str(bag_dir), data=EvalData(str(evaluated), "test", check="off"), workers=0,
                         out=str(tmp_path / "off"))
    assert run_evaluate(off) == 0  # data.check=off: the user's choice, as in training


def test_a_fifo_or_dev_zero_among_the_inputs_is_quarantined_not_read(tmp_path):
    """A FIFO named like an image blocked shards.build forever; /dev/zero behind x.png filled memory."""
    import os

    from conftest import save_image

    for i in range(4):
        save_image(tmp_path / "in" / "a" / f"{i}.png", seed=i)
        save_image(tmp_path / "in" / "b" / f"{i}.png", seed=10 + i)
    os.mkfifo(tmp_path / "in" / "a" / "fifo.png")
    (tmp_path / "in" / "b" / "zero.png").symlink_to("/dev/zero")
    done = subprocess.run([sys.executable, "-m", "shards.build", "source=imagefolder",
                           f"source.root={tmp_path / 'in'}", f"out={tmp_path / 'out'}",
                           "max_bad_fraction=0.5", "split.val=0", "split.test=0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    reasons = {line.split("\t")[0]: line.split("\t")[3]
               for line in (tmp_path / "out" / "quarantine.tsv").read_text().splitlines()[1:]}
    assert reasons == {"a/fifo.png": "not a regular file (FIFO)",
                       "b/zero.png": "not a regular file (character device)"}
    assert "10 inputs = 8 written + 2 quarantined" in done.stdout + done.stderr
