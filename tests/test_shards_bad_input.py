"""Bad and awkward inputs: each one is either written correctly or quarantined with a reason,
and the counts in `_info.json`, `quarantine.tsv` and `counts.tsv` always reconcile."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import run_build, save_image
from PIL import Image

from shards.build import TooManyBad
from shards.config import CsvSource, ImageFolderSource, ResizeConfig, ShardSizeConfig, SplitConfig
from trainer.runtime.exits import ConfigError

SPLITS = ("train", "val", "test")
IMAGE_EXTS = ("jpg", "png", "webp")
SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
NO_SPLIT = SplitConfig(val=0.0, test=0.0)


# ---------------------------------------------------------------- reading a build back


@dataclass
class Sample:
    key: str
    split: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def ext(self) -> str:
        exts = [e for e in self.members if e in IMAGE_EXTS]
        assert len(exts) == 1, f"{self.key}: image members {exts}"
        return exts[0]

    @property
    def image(self) -> bytes:
        return self.members[self.ext]

    @property
    def meta(self) -> dict:
        return json.loads(self.members["json"])

    @property
    def label(self) -> int:
        return int(self.members["cls"])

    def decode(self) -> Image.Image:
        im = Image.open(io.BytesIO(self.image))
        im.load()
        return im


def read_samples(out: Path) -> dict[str, Sample]:
    """Every sample of every shard in `out`, grouped by key = member name before the first dot."""
    samples: dict[str, Sample] = {}
    for shard in sorted(out.glob("*.tar")):
        split = shard.name.split("-", 1)[0]
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert m.isfile(), m.name
                key, ext = m.name.split(".", 1)
                s = samples.get(key)
                if s is None:
                    s = samples[key] = Sample(key, split, shard.name)
                assert s.shard == shard.name, f"key {key} in two shards"
                assert ext not in s.members, f"{m.name} twice"
                s.members[ext] = tar.extractfile(m).read()
    for s in samples.values():
        assert set(s.members) == {s.ext, "cls", "json"}, (s.key, sorted(s.members))
    return samples


def by_path(samples: dict[str, Sample]) -> dict[str, Sample]:
    out = {}
    for s in samples.values():
        path = s.meta["path"]
        assert path not in out, f"{path} stored twice"
        out[path] = s
    return out


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def read_info(out: Path) -> dict:
    return json.loads((out / "_info.json").read_text())


def assert_reconciled(out: Path, info: dict | None = None) -> dict:
    """inputs = written + quarantined everywhere: in total, per split and class, and in the files."""
    info = info if info is not None else read_info(out)
    assert info == read_info(out)
    written = sum(s["num_samples"] for s in info["splits"].values())
    assert info["inputs"] == written + info["quarantined"]
    quarantine = read_tsv(out / "quarantine.tsv")
    assert len(quarantine) == info["quarantined"]
    for row in quarantine:
        assert row["reason"].strip(), row
    counts = read_tsv(out / "counts.tsv")
    for row in counts:
        assert int(row["inputs"]) == int(row["written"]) + int(row["quarantined"]), row
    assert sum(int(r["inputs"]) for r in counts) == info["inputs"]
    assert sum(int(r["written"]) for r in counts) == written
    assert sum(int(r["quarantined"]) for r in counts) == info["quarantined"]
    samples = read_samples(out)
    assert len(samples) == written
    for split in SPLITS:
        mine = [s for s in samples.values() if s.split == split]
        assert len(mine) == info["splits"][split]["num_samples"], split
        per_class = [sum(1 for s in mine if s.label == i) for i in range(len(info["classes"]))]
        assert per_class == info["splits"][split]["class_counts"], split
    return info


def quarantine_by_path(out: Path) -> dict[str, dict[str, str]]:
    rows = read_tsv(out / "quarantine.tsv")
    table = {r["path"]: r for r in rows}
    assert len(table) == len(rows), "a path quarantined twice"
    return table


def corrections(out: Path) -> dict[str, str]:
    return {r["path"]: r["stored_as"] for r in read_tsv(out / "corrections.tsv")}


def folder(root: Path) -> ImageFolderSource:
    return ImageFolderSource(root=str(root))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def gradient16(size=(40, 30)) -> np.ndarray:
    """16-bit greyscale ramp over the whole range 0..65535 (mean ~ half scale)."""
    w, h = size
    return np.linspace(0, 65535, w * h).reshape(h, w).astype(np.uint16)


def save_awkward_modes(cls_dir: Path, size=(40, 30)) -> dict[str, Path]:
    """One image of each mode that is not plain 8-bit RGB, saved under its true extension."""
    rng = np.random.default_rng(7)
    files = {
        "cmyk": save_image(cls_dir / "cmyk.jpg", size=size, mode="CMYK", seed=1),
        "grey": save_image(cls_dir / "grey.jpg", size=size, mode="L", seed=2),
        "palette": save_image(cls_dir / "palette.png", size=size, mode="P", seed=3),
    }
    w, h = size
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(cls_dir / "rgba.png")
    files["rgba"] = cls_dir / "rgba.png"
    Image.fromarray(gradient16(size)).save(cls_dir / "grey16.png")
    files["grey16"] = cls_dir / "grey16.png"
    return files


# ---------------------------------------------------------------- image folders: quarantine


def test_broken_files_are_quarantined_with_reasons_and_counts_reconcile(tmp_path):
    root = tmp_path / "images"
    for i in range(4):
        save_image(root / "ant" / f"good{i}.jpg", seed=i)
        save_image(root / "bee" / f"good{i}.png", seed=10 + i)
    (root / "ant" / "empty.jpg").write_bytes(b"")
    (root / "ant" / "notes.jpg").write_text("this is not an image\n" * 20)
    jpeg = save_image(tmp_path / "src" / "cut.jpg", size=(64, 48), seed=5).read_bytes()
    (root / "bee" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = save_image(tmp_path / "src" / "cut.png", size=(64, 48), seed=6).read_bytes()
    (root / "bee" / "cut.png").write_bytes(png[: len(png) // 2])
    os.symlink(tmp_path / "does-not-exist.jpg", root / "ant" / "dangling.jpg")

    info = run_build(tmp_path / "out", folder(root), max_bad_fraction=1.0)

    assert_reconciled(tmp_path / "out", info)
    assert info["inputs"] == 13
    assert info["quarantined"] == 5
    bad = quarantine_by_path(tmp_path / "out")
    assert set(bad) == {"ant/empty.jpg", "ant/notes.jpg", "bee/cut.jpg", "bee/cut.png", "ant/dangling.jpg"}
    assert "empty file" in bad["ant/empty.jpg"]["reason"]
    assert "not an image" in bad["ant/notes.jpg"]["reason"]
    for cut in ("bee/cut.jpg", "bee/cut.png"):
        assert re.search("truncated|corrupt", bad[cut]["reason"]), bad[cut]
    assert "unreadable" in bad["ant/dangling.jpg"]["reason"]
    for path, row in bad.items():
        assert row["class"] == path.split("/")[0]
        assert row["split"] in SPLITS
    stored = by_path(read_samples(tmp_path / "out"))
    assert sorted(stored) == sorted([f"ant/good{i}.jpg" for i in range(4)] +
                                    [f"bee/good{i}.png" for i in range(4)])
    for path, s in stored.items():
        assert s.image == (root / path).read_bytes()
    counts = {(r["split"], r["class"]): r for r in read_tsv(tmp_path / "out" / "counts.tsv")}
    assert sum(int(r["quarantined"]) for (_, c), r in counts.items() if c == "ant") == 3
    assert sum(int(r["quarantined"]) for (_, c), r in counts.items() if c == "bee") == 2


def test_decompression_bomb_is_quarantined(tmp_path):
    limit_before = Image.MAX_IMAGE_PIXELS
    root = tmp_path / "images"
    for i in range(3):
        save_image(root / "ant" / f"small{i}.png", size=(16, 16), seed=i)  # 256 pixels
    save_image(root / "ant" / "bomb.png", size=(32, 24), seed=9)            # 768 pixels

    info = run_build(tmp_path / "out", folder(root), max_pixels=500, max_bad_fraction=1.0)

    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (4, 1)
    bad = quarantine_by_path(tmp_path / "out")
    assert list(bad) == ["ant/bomb.png"]
    assert "decompression bomb" in bad["ant/bomb.png"]["reason"]
    assert sorted(by_path(read_samples(tmp_path / "out"))) == [f"ant/small{i}.png" for i in range(3)]
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the caller's PIL limit is left as it was


def test_bad_inputs_are_quarantined_across_many_shards_and_workers(tmp_path):
    root = tmp_path / "images"
    for c in ("ant", "bee"):
        for i in range(6):
            save_image(root / c / f"{c}{i}.jpg", size=(16, 16), seed=i)
        (root / c / "empty.png").write_bytes(b"")
        (root / c / "text.jpg").write_text("hello")

    info = run_build(tmp_path / "out", folder(root), workers=2, shard=ShardSizeConfig(maxcount=2),
                     max_bad_fraction=1.0)

    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (16, 4)
    assert set(quarantine_by_path(tmp_path / "out")) == {
        "ant/empty.png", "ant/text.jpg", "bee/empty.png", "bee/text.jpg"}
    assert sum(len(s["filenames"]) for s in info["splits"].values()) >= 6


# ---------------------------------------------------------------- image folders: awkward but good


def test_awkward_modes_are_stored_byte_for_byte_in_copy_mode(tmp_path):
    root = tmp_path / "images"
    files = save_awkward_modes(root / "ant")
    with Image.open(files["grey16"]) as im:
        assert im.mode == "I;16"
    with Image.open(files["cmyk"]) as im:
        assert im.mode == "CMYK"
    with Image.open(files["palette"]) as im:
        assert im.mode == "P"

    info = run_build(tmp_path / "out", folder(root), split=NO_SPLIT)

    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (5, 0)
    stored = by_path(read_samples(tmp_path / "out"))
    assert sorted(stored) == sorted(f"ant/{p.name}" for p in files.values())
    for p in files.values():
        s = stored[f"ant/{p.name}"]
        assert s.image == p.read_bytes(), p.name
        assert s.ext == p.suffix[1:]
        assert s.meta["image"] == s.ext
        assert s.meta["class"] == "ant"
    assert corrections(tmp_path / "out") == {}


def test_awkward_modes_become_small_rgb_jpegs_when_resized(tmp_path):
    root = tmp_path / "images"
    files = save_awkward_modes(root / "ant", size=(40, 30))

    info = run_build(tmp_path / "out", folder(root), split=NO_SPLIT, resize=ResizeConfig(max_side=16))

    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (5, 0)
    stored = by_path(read_samples(tmp_path / "out"))
    notes = corrections(tmp_path / "out")
    for p in files.values():
        rel = f"ant/{p.name}"
        s = stored[rel]
        assert s.ext == "jpg"
        assert s.meta["image"] == "jpg"
        im = s.decode()
        assert im.format == "JPEG"
        assert im.mode == "RGB", p.name
        assert max(im.size) <= 16
        assert im.size == (16, 12)
        assert "resized" in notes[rel]


def test_sixteen_bit_png_is_scaled_not_clipped_when_resized(tmp_path):
    root = tmp_path / "images"
    (root / "ant").mkdir(parents=True)
    Image.fromarray(gradient16((40, 30))).save(root / "ant" / "ramp16.png")
    full = np.full((30, 40), 65535, dtype=np.uint16)
    Image.fromarray(full // 4).save(root / "ant" / "quarter16.png")  # 16383 = 1/4 of full scale

    run_build(tmp_path / "out", folder(root), split=NO_SPLIT, resize=ResizeConfig(max_side=16))

    stored = by_path(read_samples(tmp_path / "out"))
    ramp = np.asarray(stored["ant/ramp16.png"].decode().convert("L"), dtype=float)
    assert 100 < ramp.mean() < 155, ramp.mean()        # 8-bit mean of a full 16-bit ramp ~ 127
    assert ramp.max() - ramp.min() > 150                 # still a ramp, not a white sheet
    quarter = np.asarray(stored["ant/quarter16.png"].decode().convert("L"), dtype=float)
    assert abs(quarter.mean() - 64) < 8, quarter.mean()  # not clipped to 255


def test_png_named_jpg_is_stored_as_png_unchanged_and_listed_in_corrections(tmp_path):
    root = tmp_path / "images"
    fake = save_image(root / "ant" / "really_png.jpg", fmt="PNG", seed=1)
    save_image(root / "ant" / "honest.jpg", seed=2)

    info = run_build(tmp_path / "out", folder(root), split=NO_SPLIT)

    assert_reconciled(tmp_path / "out", info)
    assert info["quarantined"] == 0
    s = by_path(read_samples(tmp_path / "out"))["ant/really_png.jpg"]
    assert s.ext == "png"
    assert s.meta["image"] == "png"
    assert s.image == fake.read_bytes()
    assert s.decode().format == "PNG"
    notes = corrections(tmp_path / "out")
    assert list(notes) == ["ant/really_png.jpg"]
    assert ".png" in notes["ant/really_png.jpg"]


@pytest.mark.parametrize("resize", [None, 16], ids=["copy", "resize16"])
def test_bmp_and_tiff_are_reencoded_as_png_and_listed_in_corrections(tmp_path, resize):
    root = tmp_path / "images"
    bmp = save_image(root / "ant" / "scan.bmp", size=(12, 10), seed=1)
    tif = save_image(root / "ant" / "scan.tiff", size=(12, 10), seed=2)
    tif16 = root / "bee" / "scan16.tif"
    tif16.parent.mkdir(parents=True)
    Image.fromarray(gradient16((12, 10))).save(tif16)

    info = run_build(tmp_path / "out", folder(root), split=NO_SPLIT,
                     resize=ResizeConfig(max_side=resize))

    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (3, 0)
    stored = by_path(read_samples(tmp_path / "out"))
    notes = corrections(tmp_path / "out")
    assert set(notes) == {"ant/scan.bmp", "ant/scan.tiff", "bee/scan16.tif"}
    for p in (bmp, tif, tif16):
        rel = p.relative_to(root).as_posix()
        s = stored[rel]
        assert s.ext == "png" and s.meta["image"] == "png"
        assert "PNG" in notes[rel]
        out_im = s.decode()
        assert out_im.format == "PNG"
        with Image.open(p) as src:
            # PNG is lossless: the pixels survive re-encoding exactly
            assert np.array_equal(np.asarray(out_im), np.asarray(src)), rel


def test_odd_file_names_get_safe_keys_and_keep_their_path(tmp_path):
    root = tmp_path / "images"
    names = ["ant/my image.v2.final.jpg", "ant/éclair ü.png", "ant/a b.jpg", "ant/a_b.jpg",
             "ant/double..dot.jpg", "ant/日本語.png", "crème brûlée/x.y.z.png", "ant/sub dir/deep.name.png"]
    for i, name in enumerate(names):
        save_image(root / name, size=(8, 8), seed=i)

    info = run_build(tmp_path / "out", folder(root), split=NO_SPLIT)

    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (len(names), 0)
    assert info["classes"] == ["ant", "crème brûlée"]
    samples = read_samples(tmp_path / "out")
    for shard in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                assert SAFE_KEY.match(key), m.name
                assert ext in (*IMAGE_EXTS, "cls", "json"), m.name
    stored = by_path(samples)
    assert sorted(stored) == sorted(names)
    for name, s in stored.items():
        assert "." not in s.key
        assert SAFE_KEY.match(s.key), s.key
        assert s.image == (root / name).read_bytes()
        assert s.meta["class"] == name.split("/")[0]
    assert stored["ant/a b.jpg"].key != stored["ant/a_b.jpg"].key


def test_hidden_files_and_folders_are_ignored(tmp_path):
    root = tmp_path / "images"
    save_image(root / "ant" / "a.jpg", seed=1)
    save_image(root / "bee" / "b.png", seed=2)
    junk = [root / ".DS_Store", root / "ant" / ".DS_Store", root / "bee" / "._b.png",
            root / "ant" / "Thumbs.db", root / ".git" / "HEAD", root / "ant" / ".git" / "config"]
    for p in junk:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x00junk")
    save_image(root / ".ipynb_checkpoints" / "x.png", seed=3)
    save_image(root / "ant" / ".ipynb_checkpoints" / "a-checkpoint.png", seed=4)
    save_image(root / "bee" / ".git" / "objects" / "y.png", seed=5)
    save_image(root / ".hidden_class" / "z.png", seed=6)

    info = run_build(tmp_path / "out", folder(root), split=NO_SPLIT)

    assert_reconciled(tmp_path / "out", info)
    assert info["classes"] == ["ant", "bee"]
    assert (info["inputs"], info["quarantined"]) == (2, 0)
    assert info["empty_classes"] == []
    assert read_tsv(tmp_path / "out" / "quarantine.tsv") == []
    assert sorted(by_path(read_samples(tmp_path / "out"))) == ["ant/a.jpg", "bee/b.png"]


def test_empty_class_folder_is_reported_and_keeps_its_index(tmp_path):
    root = tmp_path / "images"
    for i in range(2):
        save_image(root / "ant" / f"a{i}.jpg", seed=i)
        save_image(root / "cat" / f"c{i}.jpg", seed=10 + i)
    (root / "bee").mkdir()
    (root / "bee" / ".DS_Store").write_bytes(b"junk")  # only litter: still empty

    info = run_build(tmp_path / "out", folder(root), split=NO_SPLIT)

    assert_reconciled(tmp_path / "out", info)
    assert info["classes"] == ["ant", "bee", "cat"]
    assert info["num_classes"] == 3
    assert info["empty_classes"] == ["bee"]
    assert (tmp_path / "out" / "classes.txt").read_text().splitlines() == ["ant", "bee", "cat"]
    assert info["splits"]["train"]["class_counts"] == [2, 0, 2]
    for path, s in by_path(read_samples(tmp_path / "out")).items():
        assert s.label == {"ant": 0, "cat": 2}[path.split("/")[0]], path
        assert s.meta["class"] == path.split("/")[0]


# ---------------------------------------------------------------- CSV / TSV sources


def write_table(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_bad_rows_are_quarantined_with_reasons(tmp_path):
    imgs = tmp_path / "imgs"
    for i in range(6):
        save_image(imgs / f"g{i}.jpg", size=(8, 8), seed=i)
    classes = tmp_path / "classes.txt"
    classes.write_text("ant\nbee\n")
    header = ["path", "label", "split", "area"]
    rows = [
        ["g0.jpg", "ant", "train", "1.5"],
        ["g1.jpg", "bee", "train", "2"],
        ["g2.jpg", "ant", "val", "3"],
        ["", "ant", "train", "1"],                 # line 5: missing path
        ["g3.jpg", "", "train", "1"],              # missing label
        ["g4.jpg", "wasp", "train", "1"],          # label not in the pinned list
        ["nowhere.jpg", "bee", "test", "1"],       # image does not exist
        ["g5.jpg", "bee", "train", "big"],         # feature is not a number
        ["g5.jpg", "bee", "bogus", "1"],           # invalid split value
        ["g0.jpg", "ant", "train", "1.5"],         # same path twice
    ]
    table = write_table(tmp_path / "meta.csv", header, rows)
    src = CsvSource(path=str(table), root=str(imgs), split_column="split", feature_columns=["area"],
                    classes=str(classes))

    info = run_build(tmp_path / "out", src, max_bad_fraction=1.0)

    assert_reconciled(tmp_path / "out", info)
    assert info["classes"] == ["ant", "bee"]
    assert (info["inputs"], info["quarantined"]) == (10, 7)
    reasons = [r["reason"] for r in read_tsv(tmp_path / "out" / "quarantine.tsv")]
    for expected in ("missing path", "missing label", "not in the class list", "unreadable",
                     "not a number", "not train/val/test", "duplicate key"):
        assert sum(expected in r for r in reasons) == 1, (expected, reasons)
    bad = quarantine_by_path(tmp_path / "out")
    missing_path = [p for p, r in bad.items() if "missing path" in r["reason"]]
    assert missing_path == [f"{table}:5"]
    assert bad["g4.jpg"]["class"] == "wasp" and "meta.csv:" in bad["g4.jpg"]["reason"]
    nowhere = next(r for p, r in bad.items() if p.endswith("nowhere.jpg"))
    assert "unreadable" in nowhere["reason"] and nowhere["split"] == "test" and nowhere["class"] == "bee"
    stored = by_path(read_samples(tmp_path / "out"))
    assert sorted(stored) == ["g0.jpg", "g1.jpg", "g2.jpg"]
    assert stored["g0.jpg"].image == (imgs / "g0.jpg").read_bytes()


def test_csv_duplicate_object_ids_are_a_config_error_naming_both_lines(tmp_path):
    # one object, two rows: which one is the truth is the user's call, not a silent first-wins
    for i in range(3):
        save_image(tmp_path / f"g{i}.png", size=(8, 8), seed=i)
    rows = [["g0.png", "ant", "obj 1"], ["g1.png", "ant", "obj 2"], ["g2.png", "bee", "obj 1"]]
    table = write_table(tmp_path / "meta.csv", ["path", "label", "object_id"], rows)
    with pytest.raises(ConfigError, match=r"source\.key_column: .*id 'obj 1' on lines 2 and 4"):
        run_build(tmp_path / "out", CsvSource(path=str(table), key_column="object_id"), split=NO_SPLIT)
    assert not (tmp_path / "out" / "_info.json").exists()


def test_csv_features_are_stored_and_empty_values_become_null(tmp_path):
    for i in range(3):
        save_image(tmp_path / "imgs" / f"g{i}.jpg", size=(8, 8), seed=i)
    rows = [["imgs/g0.jpg", "ant", "1.5", "-2e3"], ["imgs/g1.jpg", "bee", "", "7"],
            ["imgs/g2.jpg", "bee", " 3 ", ""]]
    table = write_table(tmp_path / "meta.csv", ["path", "label", "area", "depth"], rows)

    info = run_build(tmp_path / "out", CsvSource(path=str(table), feature_columns=["area", "depth"]),
                     split=NO_SPLIT)

    assert_reconciled(tmp_path / "out", info)
    assert info["features"] == ["area", "depth"]
    assert info["quarantined"] == 0
    stored = by_path(read_samples(tmp_path / "out"))
    assert stored["imgs/g0.jpg"].meta["features"] == {"area": 1.5, "depth": -2000.0}
    assert stored["imgs/g1.jpg"].meta["features"] == {"area": None, "depth": 7.0}
    assert stored["imgs/g2.jpg"].meta["features"] == {"area": 3.0, "depth": None}
    raw = stored["imgs/g1.jpg"].members["json"].decode()
    assert "NaN" not in raw and "null" in raw


def test_csv_infinite_feature_does_not_produce_invalid_json(tmp_path):
    """JSON has no Infinity: an infinite feature must be quarantined or stored as null."""
    save_image(tmp_path / "g0.jpg", size=(8, 8), seed=0)
    save_image(tmp_path / "g1.jpg", size=(8, 8), seed=1)
    table = write_table(tmp_path / "meta.csv", ["path", "label", "area"],
                        [["g0.jpg", "ant", "inf"], ["g1.jpg", "ant", "1"]])

    info = run_build(tmp_path / "out", CsvSource(path=str(table), feature_columns=["area"]),
                     split=NO_SPLIT, max_bad_fraction=1.0)

    assert_reconciled(tmp_path / "out", info)

    def reject(name):
        raise ValueError(f"not JSON: {name}")

    for s in read_samples(tmp_path / "out").values():
        json.loads(s.members["json"], parse_constant=reject)


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t"), (".csv", ";"), (".txt", "\t")],
                         ids=["csv-comma", "tsv-tab", "csv-semicolon", "txt-tab"])
def test_csv_and_tsv_delimiters_are_detected(tmp_path, suffix, delimiter):
    for i in range(4):
        save_image(tmp_path / "imgs" / f"img {i}.png", size=(8, 8), seed=i)
    rows = [[f"img {i}.png", "ant" if i % 2 else "bee", f"{i}.5"] for i in range(4)]
    table = write_table(tmp_path / f"meta{suffix}", ["path", "label", "size"], rows, delimiter)

    info = run_build(tmp_path / "out", CsvSource(path=str(table), root=str(tmp_path / "imgs"),
                                                 feature_columns=["size"]), split=NO_SPLIT)

    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (4, 0)
    assert info["classes"] == ["ant", "bee"]
    stored = by_path(read_samples(tmp_path / "out"))
    assert sorted(stored) == [f"img {i}.png" for i in range(4)]
    for i in range(4):
        s = stored[f"img {i}.png"]
        assert s.meta["class"] == ("ant" if i % 2 else "bee")
        assert s.meta["features"] == {"size": i + 0.5}


@pytest.mark.parametrize("override, column", [
    ({"path_column": "file"}, "file"),
    ({"label_column": "taxon"}, "taxon"),
    ({"split_column": "fold"}, "fold"),
    ({"key_column": "object_id"}, "object_id"),
    ({"feature_columns": ["area", "perimeter"]}, "perimeter"),
])
def test_csv_missing_column_raises_config_error_naming_it(tmp_path, override, column):
    save_image(tmp_path / "g0.jpg", size=(8, 8), seed=0)
    table = write_table(tmp_path / "meta.tsv", ["path", "label", "area"], [["g0.jpg", "ant", "1"]], "\t")

    with pytest.raises(ConfigError, match=re.escape(repr(column))) as err:
        run_build(tmp_path / "out", CsvSource(path=str(table), **override))
    key = next(iter(override))
    assert f"source.{key}" in str(err.value)
    assert not (tmp_path / "out" / "_info.json").exists()


def test_csv_split_column_is_respected(tmp_path):
    given = {"a0": "train", "a1": "Validation", "a2": "test", "a3": "valid", "a4": "TRAINING",
             "a5": "testing", "a6": "val", "a7": "train"}
    expect = {"train": "train", "validation": "val", "test": "test", "valid": "val", "training": "train",
              "testing": "test", "val": "val"}
    for i, name in enumerate(given):
        save_image(tmp_path / f"{name}.jpg", size=(8, 8), seed=i)
    rows = [[f"{n}.jpg", "ant" if i % 2 else "bee", s] for i, (n, s) in enumerate(given.items())]
    table = write_table(tmp_path / "meta.csv", ["path", "label", "split"], rows)

    # split fractions that would move items if the column were ignored
    info = run_build(tmp_path / "out", CsvSource(path=str(table), split_column="split"),
                     split=SplitConfig(val=0.5, test=0.4))

    assert_reconciled(tmp_path / "out", info)
    stored = by_path(read_samples(tmp_path / "out"))
    assert len(stored) == len(given)
    for name, split in given.items():
        assert stored[f"{name}.jpg"].split == expect[split.lower()], name
    assert [info["splits"][s]["num_samples"] for s in SPLITS] == [3, 3, 2]


# ---------------------------------------------------------------- max_bad_fraction


def make_one_bad_of_four(root: Path) -> None:
    for i in range(3):
        save_image(root / "ant" / f"good{i}.jpg", size=(8, 8), seed=i)
    (root / "ant" / "empty.jpg").write_bytes(b"")


def test_too_many_bad_raises_but_still_writes_the_reports(tmp_path):
    root = tmp_path / "images"
    make_one_bad_of_four(root)
    out = tmp_path / "out"

    with pytest.raises(TooManyBad, match="max_bad_fraction=0.1"):
        run_build(out, folder(root), max_bad_fraction=0.1, split=NO_SPLIT)

    info = assert_reconciled(out)
    assert (info["inputs"], info["quarantined"]) == (4, 1)
    (row,) = read_tsv(out / "quarantine.tsv")
    assert row["path"] == "ant/empty.jpg" and "empty file" in row["reason"]
    assert len(read_samples(out)) == 3


def test_bad_fraction_at_the_limit_does_not_raise(tmp_path):
    root = tmp_path / "images"
    make_one_bad_of_four(root)

    info = run_build(tmp_path / "out", folder(root), max_bad_fraction=0.25, split=NO_SPLIT)

    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (4, 1)


def test_default_bad_fraction_rejects_one_bad_in_four(tmp_path):
    root = tmp_path / "images"
    make_one_bad_of_four(root)

    with pytest.raises(TooManyBad):
        run_build(tmp_path / "out", folder(root), split=NO_SPLIT)
    assert read_info(tmp_path / "out")["quarantined"] == 1


def test_dangling_symlink_at_the_root_is_quarantined_not_lost(tmp_path):
    root = tmp_path / "images"
    save_image(root / "ant" / "a.jpg", seed=1)
    (root / "stray.jpg").symlink_to(tmp_path / "nowhere.jpg")
    info = run_build(tmp_path / "out", folder(root), max_bad_fraction=1.0)
    assert_reconciled(tmp_path / "out", info)
    assert (info["inputs"], info["quarantined"]) == (2, 1)
    rows = list(quarantine_by_path(tmp_path / "out").values())
    assert "outside any class folder" in rows[0]["reason"]


def test_pinned_class_list_reports_each_file_of_an_unlisted_folder(tmp_path):
    root = tmp_path / "images"
    for cls in ("ant", "bee", "detritus"):
        for i in range(2):
            save_image(root / cls / f"{i}.jpg", seed=i)
    pinned = tmp_path / "classes.txt"
    pinned.write_text("bee\nant\nwasp\n")
    info = run_build(tmp_path / "out", ImageFolderSource(root=str(root), classes=str(pinned)),
                     max_bad_fraction=1.0, split=NO_SPLIT)
    assert_reconciled(tmp_path / "out", info)
    assert info["classes"] == ["bee", "ant", "wasp"] and info["empty_classes"] == ["wasp"]
    assert (info["inputs"], info["quarantined"]) == (6, 2)
    bad = quarantine_by_path(tmp_path / "out")
    assert sorted(bad) == ["detritus/0.jpg", "detritus/1.jpg"]
    labels = {s.meta["path"]: s.label for s in read_samples(tmp_path / "out").values()}
    assert labels == {"ant/0.jpg": 1, "ant/1.jpg": 1, "bee/0.jpg": 0, "bee/1.jpg": 0}


def test_resize_of_a_large_jpeg_gives_exactly_max_side_and_names_the_original_size(tmp_path):
    root = tmp_path / "images"
    save_image(root / "ant" / "big.jpg", size=(512, 384), seed=3, quality=95)
    save_image(root / "ant" / "small.jpg", size=(40, 30), seed=4, quality=95)
    info = run_build(tmp_path / "out", folder(root), resize=ResizeConfig(max_side=64), split=NO_SPLIT)
    assert_reconciled(tmp_path / "out", info)
    stored = by_path(read_samples(tmp_path / "out"))
    assert stored["ant/big.jpg"].decode().size == (64, 48)
    assert stored["ant/small.jpg"].image == (root / "ant" / "small.jpg").read_bytes()
    assert "resized from 512x384" in corrections(tmp_path / "out")["ant/big.jpg"]
