"""Partitioned (streaming) shard builds: each array task lists its own share, writes its own shards and a
task record; finalize merges records; increments add shards; another build into the folder is refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import shard_readers as readers
from conftest import REPO, run_build, save_image

from shards.claim import CLAIM, BuildConflict
from shards.config import CsvSource, ImageFolderSource, ShardConfig, ShardSizeConfig, SplitConfig
from shards.keys import Part
from shards.listing import TASKS
from shards.manifest import IncompleteBuild
from shards.plan import key_split
from shards.verify import verify
from trainer.runtime.exits import ConfigError

KEYED = SplitConfig(val=0.2, test=0.2, method="key_hash")
SMALL = ShardSizeConfig(maxcount=4)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes (12, 8, 4 images) and one file that is no image."""
    root = tmp_path / "images"
    for c, (cls, n) in enumerate([("ant", 12), ("bee", 8), ("cat", 4)]):
        for i in range(n):
            save_image(root / cls / f"{cls}{i}.png", size=(8, 8), seed=100 * c + i)
    (root / "bee" / "broken.png").write_bytes(b"not a png")
    return root


def _tasks(out: Path, source, count: int, **kw) -> None:
    for task in range(count):
        assert run_build(out, source, partition=True, split=KEYED, shard=SMALL, stage="write",
                         task_index=task, task_count=count, **kw) is None


def _finalize(out: Path, source, count: int, **kw) -> dict:
    return run_build(out, source, partition=True, split=KEYED, shard=SMALL, stage="finalize",
                     task_count=count, **kw)


def _keys(root: Path, info: dict) -> dict[str, str]:
    """sample key -> split, read back from the shards."""
    return {k: s for s in info["splits"] for k, _, _ in readers.read_with_python_tarfile(root, s)}


def test_each_task_lists_its_share_and_the_merge_equals_one_task(folder, tmp_path):
    src = ImageFolderSource(root=str(folder))
    out = tmp_path / "p3"
    _tasks(out, src, 3)
    info = _finalize(out, src, 3)
    records = sorted((out / TASKS).glob("base-*.json"))
    assert [r.name for r in records] == [f"base-{i:05d}-of-00003.json" for i in range(3)]
    for i, rec in enumerate(records):
        data = json.loads(rec.read_text())
        assert data["classes"] == ["ant", "bee", "cat"]  # every task numbers the classes alike
        names = [name for name, _ in data["shards"]]
        assert names and all(f"-p{i:04d}-" in n for n in names)
    # the broken file is quarantined by exactly one task; the counts reconcile
    assert info["inputs"] == 25 and info["quarantined"] == 1
    keys = _keys(out, info)
    assert len(keys) == 24
    assert all(keys[k] == key_split(k, KEYED, 0) for k in keys)  # split by the key's own hash
    shares = [{k for k in keys if Part(i, 3).takes(k)} for i in range(3)]
    assert sum(map(len, shares)) == 24 and all(shares)
    one = run_build(tmp_path / "p1", src, partition=True, split=KEYED, shard=SMALL)
    assert _keys(tmp_path / "p1", one) == keys  # the same key lands in the same split either way
    assert one["splits"]["train"]["class_counts"] == info["splits"]["train"]["class_counts"]
    assert verify(out, decode=True) == []
    assert not (out / CLAIM).exists()  # a finished set is free for another build


def test_finalize_names_the_task_that_has_not_run(folder, tmp_path):
    src = ImageFolderSource(root=str(folder))
    out = tmp_path / "s"
    for task in (0, 2):
        run_build(out, src, partition=True, split=KEYED, shard=SMALL, stage="write", task_index=task,
                  task_count=3)
    with pytest.raises(IncompleteBuild, match="base task 1"):
        _finalize(out, src, 3)
    assert not (out / "_info.json").exists()


def test_a_task_that_died_halfway_is_finished_by_its_rerun(folder, tmp_path):
    src = ImageFolderSource(root=str(folder))
    out = tmp_path / "s"
    _tasks(out, src, 2)
    record = out / TASKS / "base-00001-of-00002.json"
    shards = [name for name, _ in json.loads(record.read_text())["shards"]]
    # what a kill leaves: no task record, a shard missing, the hidden temporary of the one in flight
    record.unlink()
    (out / shards[0]).unlink()
    (out / f".{shards[0]}.tmp-123").write_bytes(b"half")
    with pytest.raises(IncompleteBuild, match="base task 1"):
        _finalize(out, src, 2)
    run_build(out, src, partition=True, split=KEYED, shard=SMALL, stage="write", task_index=1, task_count=2)
    assert record.exists() and (out / shards[0]).exists()
    assert not list(out.glob(".*.tmp-*"))
    info = _finalize(out, src, 2)
    assert info["inputs"] == 25 and sum(s["num_samples"] for s in info["splits"].values()) == 24


def test_another_build_into_the_folder_is_refused_until_the_first_finishes(folder, tmp_path):
    src = ImageFolderSource(root=str(folder))
    out = tmp_path / "s"
    run_build(out, src, partition=True, split=KEYED, shard=SMALL, stage="write", task_index=0, task_count=2)
    with pytest.raises(BuildConflict, match="seed") as err:
        run_build(out, src, partition=True, split=KEYED, shard=SMALL, stage="write", task_index=1,
                  task_count=2, seed=7)
    assert str(out / CLAIM) in str(err.value)
    with pytest.raises(BuildConflict, match="task_count"):
        run_build(out, src, partition=True, split=KEYED, shard=SMALL, stage="write", task_index=0,
                  task_count=3)
    run_build(out, src, partition=True, split=KEYED, shard=SMALL, stage="write", task_index=1, task_count=2)
    _finalize(out, src, 2)
    again = run_build(out, src, partition=True, split=KEYED, shard=SMALL, seed=7)  # finished: allowed
    assert again["build"]["seed"] == 7


def test_an_increment_adds_shards_and_keeps_the_old_ones_and_their_splits(folder, tmp_path):
    src = ImageFolderSource(root=str(folder))
    out = tmp_path / "s"
    _tasks(out, src, 2)
    base = _finalize(out, src, 2)
    old_files = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    old_keys = _keys(out, base)
    month = tmp_path / "month"
    for c, (cls, n) in enumerate([("bee", 5), ("dog", 6)]):  # more of a known class, and a new class
        for i in range(n):
            save_image(month / cls / f"{cls}-new{i}.png", size=(8, 8), seed=9000 + 100 * c + i)
    new = ImageFolderSource(root=str(month))
    _tasks(out, new, 2, increment="m2")
    info = _finalize(out, new, 2, increment="m2")
    assert info["classes"] == ["ant", "bee", "cat", "dog"]  # old numbers kept, the new class after them
    assert {p.name: p.read_bytes() for p in out.glob("*.tar") if p.name in old_files} == old_files
    keys = _keys(out, info)
    assert {k: keys[k] for k in old_keys} == old_keys
    assert len(keys) == 24 + 11 and info["inputs"] == 25 + 11 and info["quarantined"] == 1
    added = [f for s in info["splits"].values() for f in s["filenames"] if f not in old_files]
    assert added and all("-m2-p" in f for f in added)
    per_class = [sum(s["class_counts"][i] for s in info["splits"].values()) for i in range(4)]
    assert per_class == [12, 8 + 5, 4, 6]
    assert [g["name"] for g in info["build"]["generations"]] == ["", "m2"]
    labels = {int(c) for s in ("train", "val", "test") for *_, c in readers.read_with_python_tarfile(out, s)}
    assert 3 in labels  # the new class's samples carry its new number


def test_increment_needs_a_finished_partitioned_set(folder, tmp_path):
    src = ImageFolderSource(root=str(folder))
    with pytest.raises(ConfigError, match="increment=m2.*build the set first"):
        run_build(tmp_path / "none", src, partition=True, split=KEYED, increment="m2")
    run_build(tmp_path / "whole", src)
    with pytest.raises(ConfigError, match="not built with partition=true"):
        run_build(tmp_path / "whole", src, partition=True, split=KEYED, increment="m2")


def test_partition_needs_the_key_split():
    with pytest.raises(ConfigError, match="split.method"):
        ShardConfig(source=ImageFolderSource(root="x"), out="o", partition=True)
    with pytest.raises(ConfigError, match="increment"):
        ShardConfig(source=ImageFolderSource(root="x"), out="o", increment="m2")


def test_a_table_is_streamed_per_task_with_the_whole_class_list(tmp_path):
    img = save_image(tmp_path / "t" / "a.png", size=(8, 8))
    rows = ["object_id,path,label"] + [f"o{i},a.png,{'rare' if i == 7 else 'common'}" for i in range(40)]
    table = tmp_path / "t" / "objects.csv"
    table.write_text("\n".join(rows) + "\n")
    src = CsvSource(path=str(table), key_column="object_id")
    _tasks(tmp_path / "s", src, 4)
    for rec in (tmp_path / "s" / TASKS).glob("*.json"):
        assert json.loads(rec.read_text())["classes"] == ["common", "rare"]  # "rare" is in one task only
    info = _finalize(tmp_path / "s", src, 4)
    assert info["inputs"] == 40 and sum(s["num_samples"] for s in info["splits"].values()) == 40
    # two rows of one id meet in one task (rows go by key), whose duplicate check names both lines
    table.write_text("\n".join(rows + ["o3,a.png,common"]) + "\n")
    failed = []
    for task in range(4):
        try:
            run_build(tmp_path / "d", src, partition=True, split=KEYED, stage="write", task_index=task,
                      task_count=4)
        except ConfigError as err:
            failed.append(str(err))
    assert len(failed) == 1 and "lines 5 and 42" in failed[0]
    assert img.exists()


def test_the_command_line_runs_a_partitioned_task(folder, tmp_path):
    out = tmp_path / "s"
    args = [sys.executable, "-m", "shards.build", "source=imagefolder", f"source.root={folder}", f"out={out}",
            "partition=true", "split.method=key_hash", "stage=write", "task_index=1", "task_count=2"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / TASKS / "base-00001-of-00002.json").exists()
    assert all("-p0001-" in p.name for p in out.glob("*.tar"))
    bad = subprocess.run(args[:-4] + ["split.method=stratified"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "split.method" in bad.stdout + bad.stderr
