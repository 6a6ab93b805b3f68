"""Bagging: Poisson(1) bootstrap resamples drawn per (bag seed, member, key), and launch.bag."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from train_fixtures import final_state, write_shardset

from trainer.config import BagRunConfig, TrainConfig
from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.transforms import AugmentConfig, train_transform
from trainer.jobs.bag import member_config, train_bag

KEYS = [f"key-{i:05d}" for i in range(20000)]


def test_bootstrap_counts_are_poisson_one_and_deterministic():
    counts = [data.bootstrap_count(7, 0, k) for k in KEYS]
    assert counts == [data.bootstrap_count(7, 0, k) for k in KEYS]  # the same on every rerun
    assert sum(counts) / len(counts) == pytest.approx(1.0, abs=0.03)  # mean repeat count ~1
    assert counts.count(0) / len(counts) == pytest.approx(0.3679, abs=0.01)  # ~36.8% absent, e^-1
    assert counts.count(2) / len(counts) == pytest.approx(0.1839, abs=0.01)
    other = [data.bootstrap_count(7, 1, k) for k in KEYS]
    assert other != counts and sum(a == b for a, b in zip(counts, other)) / len(KEYS) < 0.45
    assert [data.bootstrap_count(8, 0, k) for k in KEYS[:200]] != counts[:200]


def test_a_members_stream_repeats_samples_by_their_count(tmp_path):
    root = write_shardset(tmp_path / "s", {"train": [60, 60]})
    split = shardset.load(root, "train")
    # buffer of 1: the first pass comes out whole (a larger buffer mixes in the next pass)
    cfg = data.StreamConfig(4, 0, shuffle_buffer=1, shuffle_initial=1, bootstrap_member=3, bootstrap_seed=5)
    stream = data.TrainStream(split, train_transform(AugmentConfig(crop_size=8)), cfg, 0, 1, 1, 30)
    stream.set_epoch(0, None)
    expected = Counter()
    for shard in split.shards:
        for sample in data.read_shard(shard):
            expected[sample["__key__"]] = data.bootstrap_count(5, 3, sample["__key__"])
    one_pass = sum(expected.values())
    seen = Counter(s["__key__"] for _, s in zip(range(one_pass), stream._shuffled(0)))
    assert seen == +expected  # exactly the resample's multiset in one pass over the shards
    assert 0 < sum(1 for k in expected if expected[k] == 0) < len(expected)


def bag_config(shards: Path, run_dir: Path, *overrides: str) -> BagRunConfig:
    dots = [f"data.shards={shards}", f"run_dir={run_dir}", "model.name=resnet18", "data.crop_size=16",
            "loader.batch_size=4", "loader.workers=0", "loader.pin_memory=false", "logger.mode=disabled",
            "trainer.max_steps=3", "data.val_split=null", "schedule.warmup_epochs=0", *overrides]
    merged = OmegaConf.merge(OmegaConf.structured(BagRunConfig), OmegaConf.from_dotlist(dots))
    return OmegaConf.to_object(merged)


def test_member_configs_differ_in_seed_resample_dir_and_model(tmp_path):
    shards = write_shardset(tmp_path / "s", {"train": [4]})
    cfg = bag_config(shards, tmp_path / "bag", "bag.members=3", "bag.seed=2",
                     "bag.models=[resnet18,mobilenet_v3_small]")
    members = [member_config(cfg, i) for i in range(3)]
    assert [m.trainer.seed for m in members] == [2000, 2001, 2002]
    assert [m.data.bootstrap_member for m in members] == [0, 1, 2]
    assert [m.model.name for m in members] == ["resnet18", "mobilenet_v3_small", "resnet18"]
    assert [Path(m.run_dir).name for m in members] == ["member-00", "member-01", "member-02"]
    seeds_only = member_config(bag_config(shards, tmp_path / "b", "bag.strategy=seed"), 1)
    assert seeds_only.data.bootstrap_member is None
    assert type(seeds_only) is TrainConfig  # a member records a plain training config, not the bag's


def test_a_bag_of_two_trains_both_members_and_records_them(tmp_path):
    shards = write_shardset(tmp_path / "s", {"train": [40, 40, 40]})
    bag = tmp_path / "bag"
    assert train_bag(bag_config(shards, bag, "bag.members=2")) == 0
    record = json.loads((bag / "bag.json").read_text())
    assert [m["name"] for m in record["members"]] == ["member-00", "member-01"]
    assert record["strategy"] == "bootstrap"
    a, b = final_state(bag / "member-00"), final_state(bag / "member-01")
    assert a["step"] == b["step"] == 3
    assert not torch.equal(a["model"]["fc.weight"], b["model"]["fc.weight"])
    assert b["config"]["data"]["bootstrap_member"] == 1
    # rerunning the finished bag resumes each member and has nothing left to do
    assert train_bag(bag_config(shards, bag, "bag.members=2")) == 0
    assert final_state(bag / "member-01")["step"] == 3
