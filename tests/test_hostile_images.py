"""Hostile and careless image input (issue 14): a corrupt PNG, a header claiming 400 Mpx, a FIFO and
/dev/zero named like images. Each must become one unusable sample, never a crash, a hang or 1 GB of RSS.
"""
from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bag import bag_config
from test_train import config, train
from torchvision.io import ImageReadMode, decode_image
from train_fixtures import metrics, png, rewrite_shard, shard_samples, write_shardset

from trainer.data.transforms import MAX_PIXELS, BadSample, decode_bytes, header_size
from trainer.inference.predict import MAX_FILE_BYTES, read_image
from trainer.jobs.bag import train_bag

REPO = Path(__file__).resolve().parents[1]
GIANT = "20000x20000 = 400,000,000 pixels > limit 89,478,485"


def flipped_idat(data: bytes) -> bytes:
    """`data` (a PNG) with one byte in the middle of its first IDAT's data inverted; the CRC is left stale."""
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4:at])[0]
    out = bytearray(data)
    out[at + 4 + length // 2] ^= 0xFF
    return bytes(out)


def giant_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 16x16 PNG whose IHDR claims `width` x `height` (CRC recomputed): ~100 bytes."""
    data = bytearray(png(0, 1))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def giant_jpeg(width: int = 20000, height: int = 20000) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ---------------------------------------------------------------- decoding


TORCHVISION_DECODE = """
import sys, torch, warnings
warnings.simplefilter("ignore")
from torchvision.io import ImageReadMode, decode_image
data = open(sys.argv[1], "rb").read()
try:
    decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
except Exception as err:
    print("clean error:", err)
"""


def test_torchvision_segfaults_on_a_flipped_idat_byte_and_decode_bytes_refuses_it(tmp_path):
    """Why PNG never reaches torchvision.io: 0.29's libpng error path kills the process."""
    bad = flipped_idat(png(1, 7, size=64))
    (tmp_path / "bad.png").write_bytes(bad)
    done = subprocess.run([sys.executable, "-c", TORCHVISION_DECODE, str(tmp_path / "bad.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (-11, 139), (done.returncode, done.stdout, done.stderr)  # SIGSEGV
    assert "libpng error" in done.stderr
    with pytest.raises(BadSample, match="undecodable bad.png"):
        decode_bytes(bad, "bad.png")


@pytest.mark.parametrize("giant", [giant_png, giant_jpeg], ids=["png", "jpeg"])
def test_a_header_claiming_400_mpx_is_refused_before_decoding(giant):
    with pytest.raises(BadSample, match=f"too large: {GIANT}"):
        decode_bytes(giant(), "x")
    with pytest.raises(BadSample, match="100x100 = 10,000 pixels > limit 9,999"):
        decode_bytes(giant(100, 100), "x", max_pixels=9_999)
    assert MAX_PIXELS == 89_478_485  # shards.build's default max_pixels


def test_webp_header_sizes_agree_with_pil():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 4), dtype=np.uint8))
    for options in ({"lossless": True}, {"quality": 80}, {"quality": 80, "exif": b"Exif\0\0x"}):
        buf = io.BytesIO()
        image.convert("RGB" if "exif" not in options else "RGBA").save(buf, "WEBP", **options)
        assert header_size(buf.getvalue(), "webp", "x") == (53, 37), options


def test_png_through_pil_gives_torchvision_pixels():
    pixels = np.random.default_rng(3).integers(0, 255, (21, 34, 3), dtype=np.uint8)
    for mode in ("RGB", "RGBA", "L", "P", "LA", "1"):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, "PNG")
        data = buf.getvalue()
        expected = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert decode_bytes(data, "x").equal(expected), mode


# ---------------------------------------------------------------- training


def test_training_with_check_off_counts_hostile_samples_as_bad(tmp_path):
    """The manifest agrees with the careless bytes (`rewrite_shard`), and check=off reads them anyway."""
    shards = write_shardset(tmp_path / "s", {"train": [12], "val": [4]})
    hostile = {}
    for name in ("train-000000.tar", "val-000000.tar"):
        samples = shard_samples(shards / name)
        samples[1][1]["png"] = flipped_idat(samples[1][1]["png"])
        samples[2][1]["png"] = giant_png()
        hostile[name] = (samples[1][0], samples[2][0])
        rewrite_shard(shards, name, samples)
    # shuffle_buffer=1: read in shard order, so both are read before the epoch's 12 samples are used up
    cfg = config(shards, tmp_path / "run", "data.check='off'", "trainer.epochs=1", "loader.workers=0",
                 "data.max_bad_fraction=0.5", "data.shuffle_buffer=1")
    assert train(cfg) == 0
    rows = [line.split("\t") for line in (tmp_path / "run" / "bad_samples.tsv").read_text().splitlines()]
    reasons = {key: reason for _, _, key, reason in rows}
    flipped, giant = hostile["train-000000.tar"]
    assert set(reasons) == {flipped, giant}
    assert reasons[flipped].startswith("undecodable .png")
    assert GIANT in reasons[giant]
    val = [m for m in metrics(tmp_path / "run") if m.get("split") == "val"]
    assert val[-1]["bad_samples"] == 2 and val[-1]["n"] == 2


# ---------------------------------------------------------------- predict


def test_read_image_refuses_fifos_devices_and_huge_files_without_opening_them(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    with pytest.raises(subprocess.TimeoutExpired):  # the failure: a plain open waits for a writer
        subprocess.run([sys.executable, "-c", f"open({str(tmp_path / 'fifo.jpg')!r}, 'rb')"], timeout=3)
    with pytest.raises(BadSample, match=r"^not a regular file \(FIFO\)$"):
        read_image(tmp_path / "fifo.jpg")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(BadSample, match=r"^not a regular file \(character device\)$"):
        read_image(tmp_path / "zero.png")
    with (tmp_path / "huge.png").open("wb") as fh:  # sparse: no disk used
        fh.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(BadSample, match="file too large: 1,073,741,825 bytes > limit 1,073,741,824"):
        read_image(tmp_path / "huge.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(BadSample, match="unreadable file: No such file"):
        read_image(tmp_path / "gone.png")


@pytest.fixture(scope="module")
def bag(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bag")
    shards = write_shardset(root / "s", {"train": [12]})
    assert train_bag(bag_config(shards, root / "bag", "bag.members=1", "trainer.max_steps=1")) == 0
    return root / "bag"


def test_predict_folder_lists_hostile_files_as_unreadable_and_finishes(bag, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(png(0, 3))
    (folder / "flipped.png").write_bytes(flipped_idat(png(1, 4, size=64)))
    (folder / "giant.png").write_bytes(giant_png())
    os.mkfifo(folder / "fifo.jpg")        # opening it would wait for a writer forever
    (folder / "zero.png").symlink_to("/dev/zero")  # reading it would fill memory
    out = tmp_path / "p.tsv"
    command = [sys.executable, "-m", "launch.predict", f"bag={bag}", f"input={folder}", f"out={out}",
               "workers=1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "5 inputs = 1 predicted + 4 unreadable" in done.stdout
    with (tmp_path / "p.unreadable.tsv").open(newline="") as fh:
        reasons = {row["path"]: row["reason"] for row in csv.DictReader(fh, delimiter="\t")}
    assert reasons["fifo.jpg"] == "not a regular file (FIFO)"
    assert reasons["zero.png"] == "not a regular file (character device)"
    assert GIANT in reasons["giant.png"]
    assert reasons["flipped.png"].startswith("undecodable")
