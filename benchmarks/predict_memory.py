"""Peak RSS of `taxotrain-predict` on shard sets of two sizes: the single file (rank 0 holds every row)
against `parts=true` (rows streamed into parquet parts, one batch held). Issue 18's goal: with parts, the
peak at the larger set stays within 10% of the peak at the smaller one.

Each measurement is one `python -m launch.predict` process with `workers=0` (the rows and the model
live in that one process), its peak the `ru_maxrss` of RUSAGE_CHILDREN in a small parent (`PEAK`);
`--repeats` runs of each, interleaved, reported as mean and spread. The inputs: a bag of one resnet18
member trained for 2 steps at crop 16 on 90 generated images (the model is not the subject; it is the
same in every run), and unlabelled shard sets (`shards.build source=images`, 1,000 images per shard)
of tiny generated PNGs, made once in
`--cache` and reused: the largest is built, the smaller ones are its first shards (links and a cut
`_info.json`), so every size reads the same images.

    python benchmarks/predict_memory.py --sizes 10000 100000 --repeats 2 --cache /tmp/predict_memory
    python benchmarks/predict_memory.py --sizes 5000 50000 --repeats 1 --built 100000  # the busy 2-core VM
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine, table  # noqa: E402

CLASSES = ("red", "green", "blue")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=2)
    # the set built; every size is its first shards (default: the largest size)
    parser.add_argument("--built", type=int, default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--modes", nargs="+", choices=("single", "parts"), default=["single", "parts"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/predict_memory"))
    return parser.parse_args(argv)


def tiny_png(rng: np.random.Generator, tint: int | None = None) -> bytes:
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    if tint is not None:
        pixels[..., tint] = 255  # a learnable colour per class
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def image_folder(root: Path, count: int, labelled: bool, seed: int) -> Path:
    """`count` PNGs (in class folders when `labelled`), written once; a stamp beside it marks it whole."""
    stamp = root.with_name(root.name + ".complete")
    if stamp.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / (CLASSES[i % 3] if labelled else f"d{i // 10_000:03d}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:07d}.png").write_bytes(tiny_png(rng, i % 3 if labelled else None))
    stamp.write_text(f"{count}\n")
    return root


def shards(images: Path, out: Path, labelled: bool) -> Path:
    """`shards.build` of the folder, once (`_info.json` is written last)."""
    from shards.build import build
    from shards.config import ImageFolderSource, ImagesSource, ShardConfig, ShardSizeConfig, SplitConfig

    if not (out / "_info.json").is_file():
        source = ImageFolderSource(root=str(images)) if labelled else ImagesSource(root=str(images))
        cfg = ShardConfig(source=source, out=str(out), shard=ShardSizeConfig(maxcount=1000), workers=2,
                          split=SplitConfig(val=0.0, test=0.0), progress=False)
        with contextlib.redirect_stdout(io.StringIO()):
            build(cfg)
    return out


def subset(full: Path, out: Path, count: int) -> Path:
    """The first `count` samples' shards of `full` (whole shards of 1,000): links to its tars and index
    files, and its `_info.json` cut to them, so that every size reads the same images."""
    info = json.loads((full / "_info.json").read_text())
    split = info["splits"]["unlabelled"]
    keep = next(i for i in range(len(split["shards"]) + 1) if sum(split["shard_lengths"][:i]) >= count)
    out.mkdir(parents=True, exist_ok=True)
    for entry in split["shards"][:keep]:
        for name in (entry["filename"], entry["index"]):
            if not (out / name).exists():
                (out / name).symlink_to(full / name)
    cut = {**split, "filenames": split["filenames"][:keep], "shard_lengths": split["shard_lengths"][:keep],
           "shards": split["shards"][:keep], "num_samples": sum(split["shard_lengths"][:keep])}
    (out / "_info.json").write_text(json.dumps({**info, "splits": {"unlabelled": cut}}))
    return out


def bag(cache: Path) -> Path:
    """One resnet18 member, 2 steps at crop 16: a real bag whose cost is the same in every run."""
    from omegaconf import OmegaConf

    from trainer.config import BagRunConfig
    from trainer.jobs.bag import train_bag

    out = cache / "bag"
    if (out / "bag.json").is_file():
        return out
    train = shards(image_folder(cache / "train-images", 90, True, 0), cache / "train-shards", True)
    dots = [f"data.shards={train}", f"run_dir={out}", "model.name=resnet18", "data.crop_size=16",
            "loader.batch_size=8", "loader.workers=0", "loader.pin_memory=false", "logger.mode=disabled",
            "trainer.max_steps=2", "data.val_split=null", "schedule.warmup_epochs=0", "bag.members=1"]
    merged = OmegaConf.merge(OmegaConf.structured(BagRunConfig), OmegaConf.from_dotlist(dots))
    cfg = OmegaConf.to_object(merged)
    if train_bag(cfg) != 0:
        raise RuntimeError("training the benchmark's bag failed")
    return out


# A small Python in between: Linux carries a process's peak RSS across exec, so a child forked straight
# from this benchmark (torch loaded, a bag trained: ~1.1 GB) would report this process's peak, not its
# own. The intermediate is ~10 MB when it forks; it reports its waited-for child's peak.
PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def predict(bag_dir: Path, shard_dir: Path, out: Path, parts: bool, batch: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one predict process."""
    args = [f"bag={bag_dir}", f"input={shard_dir}", "split=unlabelled", "workers=0", f"batch_size={batch}",
            "progress_every_s=0", f"out={out}"] + (["parts=true"] if parts else [])
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "launch.predict", *args],
                          cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"predict failed: {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1]) / 1024, seconds  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    bag_dir = bag(args.cache)
    largest = args.built or max(args.sizes)
    full = shards(image_folder(args.cache / f"images-{largest}", largest, False, largest),
                  args.cache / f"shards-{largest}", False)
    sets = {n: subset(full, args.cache / f"subset-{largest}-{n}", n) for n in args.sizes}
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(args.repeats):  # interleaved: a slow moment of the shared machine hits every row
        for n, shard_dir in sets.items():
            for mode in args.modes:
                out = args.cache / "out" / f"{mode}-{n}-{r}" / ("p.tsv" if mode == "single" else "parts")
                # a rerun into an earlier run's folder would skip its finished parts: always start empty
                shutil.rmtree(out.parent, ignore_errors=True)
                results.setdefault((mode, n), []).append(predict(bag_dir, shard_dir, out, mode == "parts",
                                                                 args.batch))
    print(f"machine: {machine()}")
    print(f"command: python benchmarks/predict_memory.py {' '.join(argv or sys.argv[1:])}")
    print(table(["mode", "images>", "peak RSS MiB (mean)>", "spread>", "seconds (mean)>", "vs smallest>"],
                rows(results, args.sizes, args.modes)))


def rows(results: dict, sizes: list[int], modes: list[str]) -> list[list[str]]:
    out = []
    for mode in modes:
        base = statistics.mean(m for m, _ in results[(mode, sizes[0])])
        for n in sizes:
            peaks = [m for m, _ in results[(mode, n)]]
            mean = statistics.mean(peaks)
            out.append([mode, f"{n:,}", f"{mean:,.0f}", f"{max(peaks) - min(peaks):,.0f}",
                        f"{statistics.mean(s for _, s in results[(mode, n)]):,.0f}", f"{mean / base:.2f}x"])
    return out


if __name__ == "__main__":
    main()
