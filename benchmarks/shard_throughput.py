"""Shard-building throughput (images/s) of taxotrain next to a plain `tarfile` copy.

Measures, side by side in one run and on the same files:

- baseline: list the files, read each one and append it to a single tar with `tarfile`
  (no decode, no hashing, no fsync) -- the floor set by Python and the file system;
- taxotrain copy mode (original bytes stored, every image fully decoded to verify it),
  with workers=1 and workers=2;
- taxotrain resize mode (`resize.max_side=256`: decode, LANCZOS downscale, JPEG re-encode),
  with workers=1 and workers=2.

Why: the cost of build-time verification and resizing only means something next to the cost of
merely moving the bytes, measured on the same machine, data and page-cache state. The inputs are
ImageNet-sized JPEGs cut from the real photos bundled with scikit-image (no download), because
decode time depends on real image content; synthetic noise or flat colour would distort it.

    python benchmarks/shard_throughput.py [--images 2000] [--repeats 3] [--data DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shards.build import build  # noqa: E402
from shards.config import ImageFolderSource, ResizeConfig, ShardConfig, ShardSizeConfig  # noqa: E402

# colour photos that ship inside the scikit-image wheel; the others need a pooch download
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
NUM_CLASSES = 10
LONG_SIDE = (400, 500)  # ImageNet train images average roughly 400x350 px
JPEG_QUALITY = 90
RESIZE_MAX_SIDE = 256


@dataclass(frozen=True)
class Mode:
    name: str
    workers: int
    run: Callable[[Path], int]  # builds into a fresh directory, returns the number of images written


@dataclass(frozen=True)
class Row:
    mode: str
    workers: int
    images: int
    images_per_s: float
    min: float
    max: float
    ratio_to_baseline: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--images", type=int, default=2000, help="number of generated JPEGs (default 2000)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode after one warm-up")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "taxotrain-bench-data",
                   help="cache folder for the generated images (reused across runs)")
    p.add_argument("--shard-maxcount", type=int, default=100,
                   help="images per shard; workers parallelise over shards, so keep several per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    return p.parse_args(argv)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_model()}, {usable} usable cores ({os.cpu_count()} online), "
            f"Python {platform.python_version()}, Pillow {PIL.__version__}, {platform.system()}")


def load_photos() -> list[np.ndarray]:
    # imported here: only the first run, which generates the images, pays for scikit-image
    from skimage import data

    return [getattr(data, name)() for name in PHOTOS]


def random_crop(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A crop of 50-100% of each side (so aspect ratios vary), scaled to an ImageNet-like size."""
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    im = Image.fromarray(photo[y:y + ch, x:x + cw]).convert("RGB")
    scale = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1)) / max(cw, ch)
    im = im.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    # a mirrored copy differs byte for byte, so repeated photos are not identical inputs
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def make_dataset(cache: Path, count: int, seed: int) -> Path:
    """Class folders of `count` JPEGs; generated once per (count, seed), then reused."""
    root = cache / f"skimage-crops-n{count}-s{seed}"
    # beside the folder, not in it: taxotrain would quarantine a stray file in the source root
    stamp = cache / f"{root.name}.complete"
    if stamp.exists():
        return root
    rng = np.random.default_rng(seed)
    photos = load_photos()
    for i in range(count):
        folder = root / f"class{i % NUM_CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = photos[int(rng.integers(len(photos)))]
        random_crop(photo, rng).save(folder / f"img{i:06d}.jpg", "JPEG", quality=JPEG_QUALITY)
    # written last: a half-generated folder from an interrupted run is regenerated, not timed
    stamp.write_text(f"{count}\n")
    return root


def list_images(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.jpg"))


def describe_dataset(root: Path) -> str:
    files = list_images(root)
    sizes = []
    for f in files:
        with Image.open(f) as im:
            sizes.append(im.size)
    w, h = np.mean(sizes, axis=0)
    kib = np.mean([f.stat().st_size for f in files]) / 1024
    return (f"{len(files)} JPEGs (q{JPEG_QUALITY}) in {NUM_CLASSES} classes, crops of skimage.data "
            f"{', '.join(PHOTOS)}; mean {w:.0f}x{h:.0f} px, {kib:.0f} KiB -> {root}")


def baseline(root: Path, out: Path) -> int:
    files = list_images(root)
    with tarfile.open(out / "baseline.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, f in enumerate(files):
            data = f.read_bytes()
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return len(files)


def taxotrain(root: Path, workers: int, max_side: int | None, maxcount: int) -> Callable[[Path], int]:
    def run(out: Path) -> int:
        cfg = ShardConfig(source=ImageFolderSource(root=str(root)), out=str(out), workers=workers,
                          resize=ResizeConfig(max_side=max_side), shard=ShardSizeConfig(maxcount=maxcount),
                          progress=False)
        # build() prints a summary per run; it would bury the table
        with contextlib.redirect_stdout(io.StringIO()):
            info = build(cfg)
        if info["quarantined"]:
            raise RuntimeError(f"{info['quarantined']} images quarantined: the timing would be wrong")
        return sum(s["num_samples"] for s in info["splits"].values())
    return run


def modes(root: Path, maxcount: int) -> list[Mode]:
    found = [Mode("baseline: tarfile copy", 1, lambda out: baseline(root, out))]
    for label, max_side in (("copy", None), (f"resize max_side={RESIZE_MAX_SIDE}", RESIZE_MAX_SIDE)):
        for workers in (1, 2):
            found.append(Mode(f"taxotrain {label}", workers, taxotrain(root, workers, max_side, maxcount)))
    return found


def time_once(mode: Mode, scratch: Path, expected: int) -> float:
    """Images/s of one run into a fresh output folder (build() skips shards already up to date)."""
    out = Path(tempfile.mkdtemp(prefix="out-", dir=scratch))
    try:
        start = time.perf_counter()
        written = mode.run(out)
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(out)
    if written != expected:
        raise RuntimeError(f"{mode.name}: wrote {written} of {expected} images")
    return expected / elapsed


def measure(all_modes: list[Mode], scratch: Path, expected: int, repeats: int) -> list[list[float]]:
    """Rates per mode; rounds interleave the modes so slow drift (thermal, neighbours) hits all alike."""
    for mode in all_modes:
        time_once(mode, scratch, expected)  # warm-up: imports, page cache, pool start-up code paths
    rates: list[list[float]] = [[] for _ in all_modes]
    for r in range(repeats):
        for mode, got in zip(all_modes, rates):
            got.append(time_once(mode, scratch, expected))
            print(f"  round {r + 1}/{repeats}  {mode.name:<32} workers={mode.workers}  {got[-1]:8.1f} img/s",
                  file=sys.stderr)
    return rates


def to_rows(all_modes: list[Mode], rates: list[list[float]], images: int) -> list[Row]:
    base = statistics.median(rates[0])
    return [Row(m.name, m.workers, images, statistics.median(r), min(r), max(r), statistics.median(r) / base)
            for m, r in zip(all_modes, rates)]


def markdown(rows: list[Row]) -> str:
    lines = ["| mode | workers | images | images/s (median) | min-max | ratio to baseline |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.mode} | {r.workers} | {r.images} | {r.images_per_s:.1f} | {r.min:.1f}-{r.max:.1f} "
              f"| {r.ratio_to_baseline:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        sys.exit("error: --images and --repeats must be >= 1")
    print(f"machine: {machine()}")
    root = make_dataset(args.data.expanduser(), args.images, args.seed)
    print(f"data: {describe_dataset(root)}")
    print(f"runs: 1 warm-up + {args.repeats} timed per mode, interleaved; "
          f"shard.maxcount={args.shard_maxcount}; fresh output folder per run\n")
    all_modes = modes(root, args.shard_maxcount)
    with tempfile.TemporaryDirectory(prefix="taxotrain-bench-") as scratch:
        rates = measure(all_modes, Path(scratch), args.images, args.repeats)
    rows = to_rows(all_modes, rates, args.images)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
