"""data.check=sha256 at scale (issue 18): a run stamps each file it verified (size, mtime, sha256) in
`run_dir/verified_shards.json`, so a requeue or resume stats instead of hashing, while a file whose size
or mtime changed is hashed again and a damaged one still stops the run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_train import train
from train_fixtures import record_index_digests, write_shardset

from trainer.config import TrainConfig
from trainer.data import shardset
from trainer.runtime.cli import typed

SMALL = ["model.name=resnet18", "data.crop_size=16", "loader.batch_size=4", "loader.workers=0",
         "logger.mode=disabled", "loader.pin_memory=false", "data.val_split=null"]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return record_index_digests(write_shardset(tmp_path / "s", {"train": [8, 8, 8]}))


def no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> str:
        raise AssertionError(f"{path} was hashed although its stamp vouches for it")

    monkeypatch.setattr(shardset, "sha256_file", refuse)


def test_stamped_files_are_not_hashed_again_and_a_changed_one_is(shards, tmp_path, monkeypatch):
    split = shardset.load(shards, "train")
    first = shardset.Stamps()
    assert shardset.check(split.shards, "sha256", first) == []
    assert len(first.fresh) == 6 and first.vouched == 0  # three tars and their indexes

    with monkeypatch.context() as patch:
        no_hashing(patch)
        again = shardset.Stamps(first.fresh)
        assert shardset.check(split.shards, "sha256", again) == []
        assert again.vouched == 6 and again.fresh == {}

    # same size, new bytes and a new mtime: the stamp no longer vouches, the hash finds the damage
    tar = split.shards[1].path
    raw = bytearray(tar.read_bytes())
    raw[700] ^= 0xFF
    tar.write_bytes(bytes(raw))
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    after = shardset.Stamps(first.fresh)
    problems = shardset.check(split.shards, "sha256", after)
    assert len(problems) == 1 and str(tar) in problems[0] and "sha256" in problems[0]
    assert after.vouched == 5


def test_a_stamp_for_another_digest_or_an_unreadable_stamp_file_vouches_for_nothing(shards, tmp_path):
    split = shardset.load(shards, "train")
    first = shardset.Stamps()
    shardset.check(split.shards, "sha256", first)
    forged = {k: {**v, "sha256": "0" * 64} for k, v in first.fresh.items()}
    stamps = shardset.Stamps(forged)
    assert shardset.check(split.shards, "sha256", stamps) == [] and stamps.vouched == 0
    (tmp_path / "broken.json").write_text("[not a mapping")
    assert shardset.Stamps.read(tmp_path / "broken.json").entries == {}


def test_a_resumed_run_hashes_nothing_it_verified_before(shards, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    assert train(typed(TrainConfig, OmegaConf.from_dotlist(
        [f"data.shards={shards}", f"run_dir={run_dir}", *SMALL, "trainer.max_steps=2"]))) == 0
    stamps = json.loads((run_dir / shardset.STAMP_FILE).read_text())
    assert len(stamps) == 6
    no_hashing(monkeypatch)
    caplog.set_level("INFO", logger="trainer.data.shardset")
    assert train(typed(TrainConfig, OmegaConf.from_dotlist(
        [f"data.shards={shards}", f"run_dir={run_dir}", *SMALL, "trainer.max_steps=4"]))) == 0
    assert "0 files hashed, 6 spared" in caplog.text


def test_the_startup_benchmark_reports_one_row_per_shard_count():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "startup_check.py"
    args = ["--shards", "3", "6", "--mib", "0.1", "--repeats", "1"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [3, 6]
