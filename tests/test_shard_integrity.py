"""Hostile and careless input (issue 14): an edited `.idx`, a member name off the key rule, metadata that
does not decode, bad samples read again by a cycled shard, and class names that break classes.txt."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from conftest import run_build, save_image
from omegaconf import OmegaConf
from test_train import train
from train_fixtures import (
    metrics,
    png,
    record_index_digests,
    rewrite_shard,
    shard_samples,
    write_shardset,
)

from shards.config import CsvSource, ImageFolderSource, SplitConfig
from shards.verify import verify
from trainer.config import TrainConfig
from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.streams import DataError, StreamConfig
from trainer.data.transforms import AugmentConfig, eval_transform, train_transform
from trainer.runtime.cli import typed
from trainer.runtime.exits import RunFailure

NO_SPLIT = SplitConfig(val=0.0, test=0.0)
SMALL = ["model.name=resnet18", "data.crop_size=16", "data.scale=[0.5,1.0]", "loader.batch_size=4",
         "loader.workers=0", "logger.mode=disabled", "loader.pin_memory=false", "trainer.log_every=1"]
AUG = AugmentConfig(crop_size=12, scale=(0.3, 1.0))


def config(shards: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    dots = [f"data.shards={shards}", f"run_dir={run_dir}", *SMALL, *overrides]
    return typed(TrainConfig, OmegaConf.from_dotlist(dots))


@pytest.fixture
def built(tmp_path: Path, image_folder: Path) -> Path:
    """A set from shards.build (its own index files and digests): one train shard of 30 samples."""
    out = tmp_path / "built"
    run_build(out, ImageFolderSource(root=str(image_folder)), split=NO_SPLIT)
    assert json.loads((out / "_info.json").read_text())["splits"]["train"]["shards"][0]["index_sha256"]
    assert verify(out) == []
    return out


def edit_index(index: Path, edit) -> None:
    head, *lines = index.read_text().splitlines()
    index.write_text("\n".join([head, *edit(lines)]) + "\n")


# ---------------------------------------------------------------- the .idx is data


def test_swapped_cls_entries_of_two_index_lines_are_refused_by_verify_and_training(built, tmp_path):
    index = built / "train-000000.idx"

    def swap_cls(lines: list[str]) -> list[str]:
        a, b = (line.split() for line in lines[:2])
        i, j = a.index("cls"), b.index("cls")
        a[i:i + 4], b[j:j + 4] = b[j:j + 4], a[i:i + 4]
        return [" ".join(a), " ".join(b), *lines[2:]]

    edit_index(index, swap_cls)
    problems = verify(built)
    assert "train-000000.idx: sha256 differs from the manifest (edited or stale index)" in problems
    assert any("train-000000.idx:2: members of 2 samples on one line" in p for p in problems)
    # the manifest's digest of the index stops training before the first step, naming the file
    with pytest.raises(RunFailure, match=r"train-000000.idx: sha256 .*edited or stale index"):
        train(config(built, tmp_path / "run", "data.val_split=null", "data.check=sha256"))
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    # without the digest check, the reader itself refuses the line (data.check=size or off)
    shard = shardset.load(built, "train").shards[0]
    with pytest.raises(DataError, match=r"train-000000.idx:2: members of 2 samples on one line"):
        list(data.read_shard(shard))


def test_duplicated_index_line_is_refused_by_verify_and_training(built, tmp_path):
    edit_index(built / "train-000000.idx", lambda lines: [lines[0], lines[0], *lines[2:]])
    problems = verify(built)
    assert any("train-000000.idx:3: sample" in p and "again (first on line 2)" in p for p in problems)
    with pytest.raises(RunFailure, match="train-000000.idx: sha256"):
        train(config(built, tmp_path / "run", "data.val_split=null", "data.check=sha256"))
    shard = shardset.load(built, "train").shards[0]
    assert shardset.check([shard], "size") == []  # size mode only asks that the index exists
    with pytest.raises(DataError, match=r"train-000000.idx:3: sample .* again \(first on line 2\)"):
        list(data.read_shard(shard))


def test_missing_index_whose_digest_is_recorded_fails_the_size_check(built):
    (built / "train-000000.idx").unlink()
    problems = shardset.check(shardset.load(built, "train").shards, "size")
    assert len(problems) == 1 and "train-000000.idx: index of train-000000.tar missing" in problems[0]


def test_index_size_other_than_the_tar_header_gives_is_refused(built):
    def grow_cls(lines: list[str]) -> list[str]:
        fields = lines[0].split()
        i = fields.index("cls")
        fields[i + 2] = str(int(fields[i + 2]) + 1)  # one byte of the next header read as the label
        return [" ".join(fields), *lines[1:]]

    edit_index(built / "train-000000.idx", grow_cls)
    shard = shardset.load(built, "train").shards[0]
    with pytest.raises(DataError, match=r"line 2\): the tar header there gives 1 bytes, the index 2"):
        list(data.read_shard(shard))


def test_member_name_off_the_key_rule_is_found_by_verify(tmp_path):
    root = record_index_digests(write_shardset(tmp_path / "s", {"train": [6]}))
    samples = shard_samples(root / "train-000000.tar")
    samples[2] = ("odd+key-000002", samples[2][1])
    samples[4] = ("Zürich-000004", samples[4][1])  # not ASCII
    rewrite_shard(root, "train-000000.tar", samples)
    problems = verify(root)
    assert len(problems) == 4, problems  # 2 members each; bytes, sha256, counts and index all agree
    assert all("breaks the key rule" in p for p in problems)
    assert any("'odd+key-000002.png'" in p for p in problems)
    assert any("'Zürich-000004.cls'" in p for p in problems)


# ---------------------------------------------------------------- metadata is not the image


def test_undecodable_json_in_validation_is_bad_metadata_and_the_image_is_used(tmp_path, caplog):
    root = write_shardset(tmp_path / "s", {"train": [12], "val": [6]}, features=("area",))
    samples = shard_samples(root / "val-000000.tar")
    key = samples[3][0]
    samples[3][1]["json"] = b'{"class": "\xff\xfe"}'  # not UTF-8
    rewrite_shard(root, "val-000000.tar", samples)
    val = shardset.load(root, "val")
    batches = list(data.EvalStream(val, eval_transform(AUG), 4, 0, 1, 0, max_bad_fraction=0.01))
    assert [r for b in batches for r in b.bad] == []
    assert [k for b in batches for k in b.keys] == [k for k, _ in samples]
    assert [r.key for b in batches for r in b.bad_meta] == [key]
    assert "UTF-8" in batches[0].bad_meta[0].reason
    assert [m for b in batches for m in b.meta][3] == {}
    # a whole run: validation sees all 6 images, counts no bad sample and warns of the metadata
    with caplog.at_level(logging.WARNING, logger="trainer.data.streams"):
        assert train(config(root, tmp_path / "run", "trainer.max_steps=3")) == 0
    val_rows = [r for r in metrics(tmp_path / "run") if r.get("split") == "val"]
    assert val_rows and val_rows[-1]["n"] == 6 and val_rows[-1]["bad_samples"] == 0
    warned = [r.getMessage() for r in caplog.records if ".json member that does not decode" in r.getMessage()]
    assert warned and warned[0].startswith("1 sample(s) of val-000000.tar") and key in warned[0]


# ---------------------------------------------------------------- each bad sample once


def test_bad_samples_of_a_cycled_shard_count_once(tmp_path):
    # 5 of 8 samples bad; the epoch needs 8 good samples from 3, so the slot starts over on its
    # shard: before, 8 reads of the 5 bad ones stopped the run as "8 of its 8 samples are unusable"
    root = write_shardset(tmp_path / "s", {"train": [8]}, corrupt={("train", 0): [0, 1, 2, 3, 4]})
    split = shardset.load(root, "train")
    stream = data.TrainStream(split, train_transform(AUG), StreamConfig(4, 0, 16, 16, 0.9), 0, 1, 0, 2)
    batches = list(data.ShardLoader(stream, 0).epoch(0))
    reads = [r.key for b in batches for r in b.bad]
    bad = len(set(reads))
    assert len(reads) >= 8 > 5 >= bad >= 3  # every read is reported; the fraction counts samples
    limit = (bad - 0.5) / 8
    with pytest.raises(DataError, match=rf"train-000000.tar: {bad} of its 8 samples are unusable"):
        stream = data.TrainStream(split, train_transform(AUG), StreamConfig(4, 0, 16, 16, limit), 0, 1, 0, 2)
        list(data.ShardLoader(stream, 0).epoch(0))
    # the run (same seed, same reads): bad_samples.tsv and the logged count list each sample once
    run = tmp_path / "run"
    assert train(config(root, run, "data.val_split=null", "data.max_bad_fraction=0.9",
                        "data.shuffle_buffer=16", "trainer.seed=0", "trainer.max_steps=2")) == 0
    rows = [line.split("\t") for line in (run / "bad_samples.tsv").read_text().splitlines()]
    assert len(rows) == len({(r[1], r[2]) for r in rows}) == bad
    assert {r[0] for r in rows} == {"0"} and {r[1] for r in rows} == {"train-000000.tar"}
    assert [r["bad_samples"] for r in metrics(run) if "bad_samples" in r] == [bad]


# ---------------------------------------------------------------- class names and classes.txt


def test_class_folder_name_with_a_newline_is_quarantined_and_classes_txt_stays_one_per_line(
        image_folder, tmp_path):
    for i in range(2):
        save_image(image_folder / "bee\nwasp" / f"x{i}.png", seed=900 + i)
    save_image(image_folder / "tab\there" / "y.png", seed=950)
    out = tmp_path / "out"
    run_build(out, ImageFolderSource(root=str(image_folder)), split=NO_SPLIT, max_bad_fraction=0.5)
    info = json.loads((out / "_info.json").read_text())
    assert info["classes"] == ["ant", "bee", "cat"]
    assert (out / "classes.txt").read_text().splitlines() == info["classes"]
    written = sum(s["num_samples"] for s in info["splits"].values())
    assert (info["inputs"], written, info["quarantined"]) == (33, 30, 3)
    with (out / "quarantine.tsv").open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len((out / "quarantine.tsv").read_text().splitlines()) == 1 + 3  # one line per input
    assert sorted(r["class"] for r in rows) == ["bee\\nwasp", "bee\\nwasp", "tab\\there"]
    assert all("contains control characters" in r["reason"] for r in rows)
    # a rebuild pinned to classes.txt keeps every index
    again = tmp_path / "again"
    pinned = ImageFolderSource(root=str(image_folder), classes=str(out / "classes.txt"))
    run_build(again, pinned, split=NO_SPLIT, max_bad_fraction=0.5)
    assert json.loads((again / "_info.json").read_text())["classes"] == info["classes"]


def test_csv_label_with_a_newline_is_quarantined(tmp_path):
    folder = tmp_path / "img"
    rows = [("a.png", "ant"), ("b.png", "bee"), ("c.png", "bee\nwasp"), ("d.png", "cat\r")]
    for i, (name, _) in enumerate(rows):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png(i % 3, i))
    table = folder / "labels.csv"
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    out = tmp_path / "out"
    run_build(out, CsvSource(path=str(table), path_column="path", label_column="label"), split=NO_SPLIT,
              max_bad_fraction=0.5)
    info = json.loads((out / "_info.json").read_text())
    # "cat\r" is stripped to "cat" like any surrounding blank; "bee\nwasp" has it inside
    assert info["classes"] == ["ant", "bee", "cat"] and info["quarantined"] == 1
    assert (out / "classes.txt").read_text().splitlines() == info["classes"]
    assert "contains control characters" in (out / "quarantine.tsv").read_text()
