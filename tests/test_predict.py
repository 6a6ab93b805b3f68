"""launch.predict: top-k ensemble predictions for a folder of images or for (unlabelled) shards."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_bag import bag_config
from train_fixtures import CLASSES, png, write_shard, write_shardset

from trainer.data.transforms import decode_bytes
from trainer.inference.config import PredictConfig
from trainer.inference.ensemble import combine
from trainer.inference.members import augment_config, input_transform, load_bag, probabilities
from trainer.inference.predict import list_images, run
from trainer.jobs.bag import train_bag
from trainer.runtime.cli import typed
from trainer.runtime.exits import ConfigError

REPO = Path(__file__).resolve().parents[1]
READABLE = ["ant/a1.png", "ant/a2.png", "bee/b2.jpg", "bee/deep/b1.png", "bee/deep/b3.bmp", "cat/c1.png",
            "top.png"]
UNREADABLE = ["cat/broken.png", "cat/empty.jpg"]


@pytest.fixture(scope="module")
def bag(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bag")
    shards = write_shardset(root / "s", {"train": [40, 40, 40]})
    assert train_bag(bag_config(shards, root / "bag", "bag.members=2")) == 0
    return root / "bag"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """7 readable images in nested folders (PNG, JPEG, BMP), 2 broken ones, a note and hidden files."""
    root = tmp_path_factory.mktemp("images")
    for i, rel in enumerate(READABLE):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(io.BytesIO(png(i % 3, 500 + i, size=20 + i)))
        image.save(path, format={".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP"}[path.suffix])
    broken = png(2, 9, size=32)
    (root / "cat" / "broken.png").write_bytes(broken[: len(broken) // 2])  # cut inside the image data
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden.png").write_bytes(png(0, 1))
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "t.png").write_bytes(png(0, 2))
    return root


def read_table(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="," if path.suffix == ".csv" else "\t"))


@pytest.fixture(scope="module")
def members(bag) -> list:
    return load_bag(bag, [], "best", torch.device("cpu"))


def direct(members: list, image: bytes, tta: str, mode: str) -> torch.Tensor:
    """The ensemble's probabilities for one image, computed without launch.predict."""
    view = input_transform(augment_config(members[0]), tta)(decode_bytes(image, "test"))[None]
    return combine([probabilities(m, view, tta) for m in members], mode)[0]


def ranked(row: dict, k: int) -> list[tuple[str, float]]:
    return [(row[f"class_{i}"], float(row[f"prob_{i}"])) for i in range(1, k + 1)]


def test_listing_is_sorted_skips_hidden_and_non_images(folder):
    paths, skipped = list_images(folder)
    assert paths == sorted(READABLE + UNREADABLE)
    assert dict(skipped) == {".txt": 1}


def test_folder_predictions_match_the_ensemble_and_keep_unreadable_files(bag, members, folder, tmp_path,
                                                                        capsys):
    out = tmp_path / "p" / "preds.tsv"
    assert run(PredictConfig(bag=str(bag), input=str(folder), out=str(out), workers=2, batch_size=3)) == 0
    rows = read_table(out)
    k = len(CLASSES)  # top_k=5 clipped to the 3 classes
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3",
                             "decision"]
    assert {r["decision"] for r in rows} == {"review"}  # no calibration.json: nothing accepted unseen
    assert [r["path"] for r in rows] == sorted(READABLE)
    for row in rows:
        probs = [p for _, p in ranked(row, k)]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and sum(probs) <= 1 + 1e-5
        assert sorted(c for c, _ in ranked(row, k)) == sorted(CLASSES)
    for rel in ("ant/a1.png", "bee/b2.jpg"):
        expected = direct(members, (folder / rel).read_bytes(), "none", "mean")
        row = next(r for r in rows if r["path"] == rel)
        for name, p in ranked(row, k):
            assert p == pytest.approx(float(expected[CLASSES.index(name)]), abs=1e-6), (rel, name)
    bad = read_table(tmp_path / "p" / "preds.unreadable.tsv")
    assert [b["path"] for b in bad] == UNREADABLE
    assert "truncated" in bad[0]["reason"] or "corrupt" in bad[0]["reason"]
    assert bad[1]["reason"] == "empty file (0 bytes)"
    printed = capsys.readouterr().out
    assert "9 inputs = 7 predicted + 2 unreadable" in printed
    assert "not images (by extension), not counted: 1 .txt" in printed


def test_csv_tta_geometric_and_top_k(bag, members, folder, tmp_path):
    out = tmp_path / "preds.csv"
    cfg = PredictConfig(bag=str(bag), input=str(folder), out=str(out), tta="fivecrop", combine="geometric",
                        top_k=2, workers=0)
    assert run(cfg) == 0
    assert out.read_text().splitlines()[0] == "path,class_1,prob_1,class_2,prob_2,decision"
    rows = read_table(out)
    assert len(rows) == 7
    expected = direct(members, (folder / "cat/c1.png").read_bytes(), "fivecrop", "geometric")
    row = next(r for r in rows if r["path"] == "cat/c1.png")
    best = expected.topk(2)
    assert [c for c, _ in ranked(row, 2)] == [CLASSES[i] for i in best.indices]
    assert [p for _, p in ranked(row, 2)] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert sum(p for _, p in ranked(row, 2)) < 1
    assert (tmp_path / "preds.unreadable.csv").read_text().startswith("path,reason\n")


def test_default_output_goes_into_the_bag_not_the_image_folder(bag, folder):
    before = sorted(p.name for p in folder.rglob("*"))
    assert run(PredictConfig(bag=str(bag), input=str(folder), workers=0)) == 0
    assert len(read_table(bag / "predictions.tsv")) == 7
    assert len(read_table(bag / "predictions.unreadable.tsv")) == 2
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_only_unreadable_images_still_give_both_tables(bag, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "p.tsv"
    assert run(PredictConfig(bag=str(bag), input=str(tmp_path / "in"), out=str(out), top_k=2, workers=0)) == 0
    assert out.read_text() == "path\tclass_1\tprob_1\tclass_2\tprob_2\tdecision\n"
    assert [b["path"] for b in read_table(tmp_path / "p.unreadable.tsv")] == ["x.jpg"]
    assert "1 inputs = 0 predicted + 1 unreadable" in capsys.readouterr().out


def unlabelled_shards(root: Path, counts: list[int], corrupt: set[tuple[int, int]]) -> Path:
    """Shards without .cls (images to classify), each sample's .json naming its source path."""
    root.mkdir(parents=True)
    entries = []
    for s, count in enumerate(counts):
        samples = []
        for j in range(count):
            image = png(j % 3, 100 * s + j)
            image = image[:30] if (s, j) in corrupt else image
            meta = json.dumps({"path": f"station{s}/img{j}.png"}).encode()
            samples.append((f"u{s}_{j:03d}", {"png": image, "json": meta}))
        name = f"test-{s:06d}.tar"
        write_shard(root / name, samples)
        blob = (root / name).read_bytes()
        entries.append({"filename": name, "num_samples": count, "bytes": len(blob),
                        "sha256": hashlib.sha256(blob).hexdigest()})
    split = {"name": "test", "num_samples": sum(counts), "filenames": [e["filename"] for e in entries],
             "shard_lengths": counts, "shards": entries}
    info = {"format": "taxotrain-shards/1", "classes": list(CLASSES), "num_classes": len(CLASSES),
            "splits": {"test": split}}
    (root / "_info.json").write_text(json.dumps(info))
    return root


def test_unlabelled_shards_give_one_row_per_sample_with_keys(bag, tmp_path, capsys):
    shards = unlabelled_shards(tmp_path / "u", [5, 4], corrupt={(1, 2)})
    out = tmp_path / "shard-preds.tsv"
    cfg = PredictConfig(bag=str(bag), input=str(shards), out=str(out), top_k=1, workers=2, batch_size=2)
    assert run(cfg) == 0
    rows = read_table(out)
    assert list(rows[0]) == ["key", "path", "class_1", "prob_1", "decision"]
    keys = [f"u0_{j:03d}" for j in range(5)] + ["u1_000", "u1_001", "u1_003"]
    assert [r["key"] for r in rows] == keys
    assert rows[0]["path"] == "station0/img0.png" and rows[-1]["path"] == "station1/img3.png"
    assert all(r["class_1"] in CLASSES and 1 / 3 <= float(r["prob_1"]) <= 1 for r in rows)
    bad = read_table(tmp_path / "shard-preds.unreadable.tsv")
    assert [(b["key"], b["shard"]) for b in bad] == [("u1_002", "test-000001.tar")]
    assert "undecodable" in bad[0]["reason"]
    assert "9 inputs = 8 predicted + 1 unreadable" in capsys.readouterr().out


def test_labelled_shards_predict_the_chosen_split(bag, tmp_path):
    shards = write_shardset(tmp_path / "s", {"train": [4], "val": [3, 2]})
    out = tmp_path / "val.tsv"
    assert run(PredictConfig(bag=str(bag), input=str(shards), split="val", out=str(out), workers=0)) == 0
    rows = read_table(out)
    assert len(rows) == 5 and all(r["key"].startswith("val") and r["path"] == "" for r in rows)


@pytest.mark.parametrize(("setting", "message"), [
    ({"top_k": 0}, "top_k"), ({"tta": "rotate"}, "tta"), ({"combine": "median"}, "combine"),
    ({"checkpoint": "first"}, "checkpoint"), ({"input": "/nonexistent/images"}, "input"),
    ({"bag": "/nonexistent/bag"}, "bag"), ({"out": str(REPO / "conf")}, "out"),
])
def test_bad_settings_name_the_key(bag, folder, setting, message):
    with pytest.raises(ConfigError, match=message):
        typed(PredictConfig, {"bag": str(bag), "input": str(folder), **setting})


def test_bad_inputs_name_the_setting_or_file(bag, folder, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ConfigError, match=r"input: no images in .*empty.*\.md"):
        run(PredictConfig(bag=str(bag), input=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="input: .*readme.md is neither a folder of images nor a shard"):
        run(PredictConfig(bag=str(bag), input=str(tmp_path / "empty" / "readme.md")))
    with pytest.raises(ConfigError, match="neither a bag"):
        run(PredictConfig(bag=str(tmp_path), input=str(folder)))
    with pytest.raises(ConfigError, match="member-07"):
        run(PredictConfig(bag=str(bag), input=str(folder), members=["member-07"]))


def clean_env(**extra: str) -> dict[str, str]:
    """No inherited launcher variables (pytest may itself run inside an srun step)."""
    launch_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launch_vars}
    return env | {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def test_cli_exits_2_naming_the_key(bag, tmp_path):
    command = [sys.executable, "-m", "launch.predict", f"bag={bag}", f"input={tmp_path / 'missing'}"]
    done = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "input:" in done.stdout + done.stderr and "does not exist" in done.stdout + done.stderr


def test_two_torchrun_ranks_write_the_same_table_as_one_process(bag, folder, tmp_path):
    one = tmp_path / "one.tsv"
    assert run(PredictConfig(bag=str(bag), input=str(folder), out=str(one), workers=0, batch_size=2)) == 0
    two = tmp_path / "two.tsv"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "launch.predict", f"bag={bag}", f"input={folder}", f"out={two}", "workers=0",
               "batch_size=2"]
    done = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("9 inputs = 7 predicted + 2 unreadable") == 1  # rank 0 only
    a, b = read_table(one), read_table(two)
    assert [r["path"] for r in a] == [r["path"] for r in b] == sorted(READABLE)
    for x, y in zip(a, b):
        assert ranked(x, 3) == [(c, pytest.approx(p, abs=2e-6)) for c, p in ranked(y, 3)]
    assert read_table(tmp_path / "two.unreadable.tsv") == read_table(tmp_path / "one.unreadable.tsv")
