"""Loader throughput (images/s) of every input backend, side by side on the same JPEGs.

Each backend yields uint8 [B, 3, crop, crop] batches through the loader contract
(`batches_per_epoch`, `epoch(e)` -> `Batch`), with the same augmentation: RandomResizedCrop(crop,
scale (0.08, 1)) + horizontal flip, the same batch size and the same number of DataLoader workers:

- `imagefolder`: torchvision `ImageFolder` (PIL decode) + `DataLoader(shuffle=True)` with
  `transforms.v2` RandomResizedCrop, RandomHorizontalFlip, PILToTensor: the reference users know;
- `webdataset`: ours, `trainer.data.TrainStream` + `ShardLoader` over the shards' train split, as
  `trainer/loop.py` builds them (torchvision.io decode, seeded per-sample augmentation);
- `dali-cpu`, `dali-gpu`: `trainer.data.dali.DaliLoader`; a row says `not available: <reason>` when DALI
  cannot be imported or the loader cannot be built;
- `torchvision-gpu`: `trainer.data.gpu_decode.GpuDecodeLoader`: workers read JPEG bytes from the shards,
  the main process decodes a whole batch with `torchvision.io.decode_jpeg(..., device="cuda")` and
  crops each image on the GPU;
- `synthetic`: `trainer.data.SyntheticLoader`, one random batch reused: the upper bound of the loop;
- `ceiling`: `torchvision.io.decode_jpeg` + the same transform in this one process on one thread, from
  bytes already in memory, times `--workers`: what the workers could do with no overhead at all (the
  issue's definition, and the reference of the `ratio to ceiling` column);
- `ceiling-parallel`: the same loop in `--workers` forked processes started together, images over the
  span from the first start to the last end: what this machine's cores deliver at once. Against it, a
  backend's ratio is its own overhead with the machine's multi-core scaling taken out.

GPU rows are measured only where `torch.cuda.is_available()`. Every backend gets one untimed warm-up
run first; then `--repeats` rounds interleave the backends (drifting load hits all alike). A run starts
a fresh epoch iterator (new DataLoader workers; DALI keeps the pipeline its warm-up built), drops its
first `--warmup-batches` batches (worker start-up, shuffle-buffer fill) and times the next `--batches`.
The table gives the median images/s and min-max. This is the loader alone, with nothing else competing
for the cores: on a machine with few cores, check that no other job runs (the load average is printed).
The `ceiling` assumes one free core per worker; the main process needs CPU too, so with as many workers
as cores it overstates what any backend can reach.

The JPEGs are random crops of the colour photos bundled with scikit-image (never downloaded), scaled
to ImageNet's typical 500x375 (or 500x333, some portrait), quality 90, in 10 class folders. They are
generated once into `--data`, and sharded there with `shards.build` (`shard.maxcount=100`, so every
worker has shards), then reused.

    python benchmarks/loader.py [--images 2000] [--batch 64] [--workers 2] [--batches 20] [--repeats 3] \
        [--backends imagefolder webdataset ...] [--data DIR] [--json PATH]

What docs/BENCHMARKS.md reports (2-core VM, no GPU):

    python benchmarks/loader.py --images 2000 --batches 20 --repeats 5 --workers 2 --json /tmp/loader.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# trainer.transforms also mutes torchvision's per-call decoder deprecation warning
from common import fmt, machine, table  # noqa: E402

from shards.build import build  # noqa: E402
from shards.config import ImageFolderSource, ShardConfig, ShardSizeConfig  # noqa: E402
from trainer.data import shardset  # noqa: E402
from trainer.data.gpu_decode import GpuDecodeLoader, RawStream  # noqa: E402
from trainer.data.shardset import ShardSet  # noqa: E402
from trainer.data.streams import (  # noqa: E402
    Batch,
    ShardLoader,
    StreamConfig,
    SyntheticLoader,
    TrainStream,
    read_shard,
    steps_per_epoch,
)
from trainer.data.transforms import IMAGE_KEYS, AugmentConfig, train_transform  # noqa: E402

BACKENDS = ("imagefolder", "webdataset", "dali-cpu", "dali-gpu", "torchvision-gpu", "synthetic", "ceiling",
            "ceiling-parallel")
GPU_BACKENDS = ("dali-gpu", "torchvision-gpu")
OPTIONAL = ("dali-cpu", *GPU_BACKENDS)  # a failure in these is a row, not a crash
TARGETS = {"imagefolder": 1.3, "ceiling": 0.85}  # issue "Fast data paths": webdataset / these

# colour photos inside the scikit-image wheel (skimage/data/*); the others need a pooch download
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "stereo_motorcycle")
NUM_CLASSES = 10
LONG_SIDE = 500
ASPECT = (4 / 3, 3 / 2)  # ImageNet's most common shapes: 500x375 and 500x333
PORTRAIT = 0.2
JPEG_QUALITY = 90
CACHE = Path(tempfile.gettempdir()) / "taxotrain-loader-bench"  # generated JPEGs and shards, reused


class Unavailable(RuntimeError):
    """This backend cannot run here; the message says why (shown in its row)."""


@dataclass(frozen=True)
class Row:
    backend: str
    batch: int
    workers: int
    crop: int
    images: int
    repeats: int
    batches: int
    images_per_s: float | None
    min: float | None
    max: float | None
    ratio_to_imagefolder: float | None
    ratio_to_ceiling: float | None
    note: str


@dataclass(frozen=True)
class Bench:
    name: str
    run: Callable[[int], float]  # epoch -> images/s of one timed run
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--images", type=int, default=2000, help="generated JPEGs (default 2000)")
    p.add_argument("--batch", type=int, default=64, help="images per batch (default 64, loader.batch_size)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of every backend (default 2)")
    p.add_argument("--crop", type=int, default=224, help="RandomResizedCrop size (default 224)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per run (default 20)")
    p.add_argument("--warmup-batches", type=int, default=3,
                   help="batches dropped at the start of every run: worker start-up, buffer fill (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per backend after one warm-up run")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), metavar="NAME",
                   help=f"a subset of {', '.join(BACKENDS)} (default: all)")
    p.add_argument("--data", type=Path, default=CACHE,
                   help="cache folder for the generated JPEGs and their shards (reused across runs)")
    p.add_argument("--shard-maxcount", type=int, default=100, help="images per shard (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    args = p.parse_args(argv)
    for name in ("images", "batch", "batches", "repeats", "shard_maxcount", "crop"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0 or args.warmup_batches < 0:
        p.error("--workers and --warmup-batches must be >= 0")
    return args


# ---------------------------------------------------------------- data


def load_photos() -> list[np.ndarray]:
    from skimage import data  # only the generating run pays for scikit-image

    photos = [getattr(data, name)() for name in PHOTOS]
    return [p[0] if isinstance(p, tuple) else p for p in photos]  # stereo_motorcycle: (left, right, disp)


def random_photo(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """50-100% of the largest window of an ImageNet-like shape, scaled to 500 px on its long side."""
    h, w = photo.shape[:2]
    aspect = rng.uniform(*ASPECT)
    aspect = 1 / aspect if rng.random() < PORTRAIT else aspect  # width / height
    fit_h = min(h, w / aspect) * rng.uniform(0.5, 1.0)
    ch, cw = max(1, int(fit_h)), max(1, int(fit_h * aspect))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    size = (LONG_SIDE, round(LONG_SIDE / aspect)) if aspect >= 1 else (round(LONG_SIDE * aspect), LONG_SIDE)
    im = Image.fromarray(photo[y:y + ch, x:x + cw]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    # a mirrored copy differs byte for byte, so repeated photos are not identical inputs
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def make_images(cache: Path, count: int, seed: int) -> Path:
    """Class folders of `count` JPEGs; generated once per (count, seed), then reused."""
    root = cache / f"skimage-{LONG_SIDE}px-n{count}-s{seed}"
    # beside the folder, not in it: shards.build would quarantine a stray file in the source root
    stamp = cache / f"{root.name}.complete"
    if stamp.exists():
        return root
    print(f"generating {count} JPEGs in {root} ...", file=sys.stderr)
    rng = np.random.default_rng(seed)
    photos = load_photos()
    for i in range(count):
        folder = root / f"class{i % NUM_CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = photos[int(rng.integers(len(photos)))]
        random_photo(photo, rng).save(folder / f"img{i:06d}.jpg", "JPEG", quality=JPEG_QUALITY)
    stamp.write_text(f"{count}\n")  # last: an interrupted generation is redone, never timed
    return root


def make_shards(root: Path, cache: Path, maxcount: int, seed: int) -> Path:
    """`shards.build source=imagefolder` of the folder, once; the manifest is written last."""
    out = cache / f"shards-{root.name}-m{maxcount}"
    if not (out / "_info.json").is_file():
        print(f"building shards in {out} ...", file=sys.stderr)
        cfg = ShardConfig(source=ImageFolderSource(root=str(root)), out=str(out), seed=seed,
                          shard=ShardSizeConfig(maxcount=maxcount), workers=2, progress=False)
        with contextlib.redirect_stdout(io.StringIO()):  # build() prints a summary; keep the table clean
            info = build(cfg)
        if info["quarantined"]:
            raise RuntimeError(f"{info['quarantined']} generated images quarantined: see {out}")
    return out


def bench_set(cache: Path, count: int, maxcount: int, seed: int) -> tuple[Path, ShardSet]:
    """The JPEG folder and the train split of its shards, made on first use (shared by the benchmarks)."""
    root = make_images(cache, count, seed)
    return root, shardset.load(make_shards(root, cache, maxcount, seed), "train")


def describe(root: Path, train: ShardSet) -> str:
    files = sorted(root.glob("*/*.jpg"))
    sizes = []
    for f in files:
        with Image.open(f) as im:
            sizes.append(im.size)
    w, h = np.mean(sizes, axis=0)
    kib = np.mean([f.stat().st_size for f in files]) / 1024
    return (f"{len(files)} JPEGs (q{JPEG_QUALITY}, mean {w:.0f}x{h:.0f} px, {kib:.0f} KiB) in {NUM_CLASSES} "
            f"classes, crops of skimage.data {', '.join(PHOTOS)} -> {root}; train split: "
            f"{train.num_samples} images in {len(train.shards)} shards")


# ---------------------------------------------------------------- backends


class FolderLoader:
    """The usual torchvision input pipeline behind the loader contract."""

    def __init__(self, root: Path, aug: AugmentConfig, batch: int, workers: int, seed: int) -> None:
        from torchvision import datasets
        from torchvision.transforms import v2

        crop = v2.RandomResizedCrop(aug.crop_size, scale=aug.scale, ratio=aug.ratio, antialias=True)
        tf = v2.Compose([crop, v2.RandomHorizontalFlip(aug.hflip), v2.PILToTensor()])
        self.dataset = datasets.ImageFolder(str(root), transform=tf)
        self.batch, self.workers, self.seed = batch, workers, seed
        self.batches_per_epoch = len(self.dataset) // batch

    def epoch(self, epoch: int) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, self.batch, shuffle=True, num_workers=self.workers, drop_last=True,
                            prefetch_factor=2 if self.workers else None,
                            generator=torch.Generator().manual_seed(self.seed + epoch))
        for images, labels in loader:
            yield Batch(images, labels)


def dali_loader(device: str, train: ShardSet, aug: AugmentConfig, batch: int, workers: int,
                batches_per_epoch: int, seed: int):  # -> trainer.data.dali.DaliLoader
    if device == "gpu" and not torch.cuda.is_available():
        raise Unavailable("no GPU")
    try:
        from trainer.data.dali import DaliLoader, DaliOptions
    except Exception as err:  # ImportError, or DALI itself failing to load its libraries
        raise Unavailable(f"import trainer.dali: {type(err).__name__}: {err}") from err
    # DALI's CPU threads stand in for the DataLoader workers: the same number of cores at work
    options = DaliOptions(device=device, threads=max(1, workers),
                          device_id=torch.cuda.current_device() if device == "gpu" else None)
    try:
        return DaliLoader(train, aug, batch, rank=0, world=1, batches_per_epoch=batches_per_epoch, seed=seed,
                          options=options)
    except Exception as err:
        raise Unavailable(f"DaliLoader: {type(err).__name__}: {err}") from err


class Ceiling:
    """decode_jpeg + the training transform, one thread, bytes in memory, times the worker count."""

    def __init__(self, train: ShardSet, aug: AugmentConfig, batch: int, count: int, workers: int) -> None:
        samples = itertools.chain.from_iterable(read_shard(s) for s in itertools.cycle(train.shards))
        self.blobs = [torch.frombuffer(bytearray(s[next(k for k in IMAGE_KEYS if k in s)]), dtype=torch.uint8)
                      for s in itertools.islice(samples, count * batch)]
        self.transform, self.batch, self.workers = train_transform(aug), batch, max(1, workers)

    def run(self, epoch: int, skip: int) -> float:
        start, end, images = self.span(epoch, skip)
        return self.workers * images / (end - start)

    def run_parallel(self, epoch: int, skip: int) -> float:
        """`span` in `workers` processes at once; images / (last end - first start)."""
        ctx = mp.get_context("fork")  # the children inherit the blobs; nothing is pickled
        barrier, spans = ctx.Barrier(self.workers), ctx.Queue()

        def one(seed: int) -> None:
            barrier.wait()  # all start together, after their fork
            spans.put(self.span(seed, skip))

        procs = [ctx.Process(target=one, args=(epoch * self.workers + i,), daemon=True)
                 for i in range(self.workers)]
        for proc in procs:
            proc.start()
        got: list[tuple[float, float, int]] = []
        try:
            while len(got) < len(procs):
                with contextlib.suppress(queue.Empty):
                    got.append(spans.get(timeout=1))
                    continue
                if failed := [p.exitcode for p in procs if p.exitcode not in (None, 0)]:
                    raise RuntimeError(f"a ceiling-parallel process exited with {failed[0]}")
        finally:
            for proc in procs:
                proc.join(timeout=60)
                if proc.is_alive():  # e.g. left at the barrier by a sibling that died
                    proc.terminate()
        # perf_counter is CLOCK_MONOTONIC on Linux: one clock for all processes
        return sum(n for _, _, n in got) / (max(e for _, e, _ in got) - min(s for s, _, _ in got))

    def span(self, seed: int, skip: int) -> tuple[float, float, int]:
        """(start, end, images) of one thread's loop over the blobs, the first `skip` batches untimed."""
        from torchvision.io import ImageReadMode, decode_jpeg

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        torch.manual_seed(seed)
        try:
            start = time.perf_counter()
            for b in range(len(self.blobs) // self.batch):
                if b == skip:
                    start = time.perf_counter()
                chunk = self.blobs[b * self.batch:(b + 1) * self.batch]
                torch.stack([self.transform(decode_jpeg(x, mode=ImageReadMode.RGB)) for x in chunk])
            return start, time.perf_counter(), len(self.blobs) - skip * self.batch
        finally:
            torch.set_num_threads(threads)


# ---------------------------------------------------------------- timing


def batches(loader, first_epoch: int) -> Iterator[Batch]:
    for epoch in itertools.count(first_epoch):
        yield from loader.epoch(epoch)


def time_loader(loader, epoch: int, skip: int, count: int, cuda: bool) -> float:
    """Images/s over `count` batches of a fresh epoch iterator, after dropping its first `skip`."""
    stream = batches(loader, epoch)
    try:
        for _ in range(skip):
            next(stream)
        if cuda:
            torch.cuda.synchronize()
        start, images = time.perf_counter(), 0
        for _ in range(count):
            images += len(next(stream).labels)
        if cuda:
            torch.cuda.synchronize()
        return images / (time.perf_counter() - start)
    finally:
        stream.close()  # shuts the workers down, outside the timed span


def make_bench(name: str, args: argparse.Namespace, root: Path, train: ShardSet) -> Bench:
    """The backend's timed run; raises `Unavailable` with the reason when it cannot run here."""
    aug = AugmentConfig(crop_size=args.crop)
    per_epoch = steps_per_epoch(train.num_samples, args.batch, 1, 1)
    skip, count = args.warmup_batches, args.batches
    if name in GPU_BACKENDS and not torch.cuda.is_available():
        raise Unavailable("not measured (no GPU)")
    if name == "ceiling":
        ceiling = Ceiling(train, aug, args.batch, skip + count, args.workers)
        return Bench(name, lambda e: ceiling.run(e, skip), f"1 process, 1 thread, x{max(1, args.workers)}")
    if name == "ceiling-parallel":
        ceiling = Ceiling(train, aug, args.batch, skip + count, args.workers)
        return Bench(name, lambda e: ceiling.run_parallel(e, skip),
                     f"{max(1, args.workers)} processes at once, 1 thread each")
    if name == "imagefolder":
        loader = FolderLoader(root, aug, args.batch, args.workers, args.seed)
    elif name == "webdataset":
        stream = TrainStream(train, train_transform(aug), StreamConfig(args.batch, args.seed), rank=0,
                             world=1, workers=args.workers, batches_per_epoch=per_epoch)
        loader = ShardLoader(stream, args.workers)
    elif name == "synthetic":
        loader = SyntheticLoader(train.num_samples, train.num_classes, args.batch, args.crop, per_epoch,
                                 args.seed, rank=0)
    elif name == "torchvision-gpu":
        stream = RawStream(train, train_transform(aug), StreamConfig(args.batch, args.seed), rank=0, world=1,
                           workers=args.workers, batches_per_epoch=per_epoch)
        loader = GpuDecodeLoader(stream, args.workers, "cuda", pin_memory=True)
    else:
        loader = dali_loader(name.split("-")[1], train, aug, args.batch, args.workers, per_epoch, args.seed)
    cuda = name in GPU_BACKENDS
    crosses = skip + count > loader.batches_per_epoch
    note = "runs cross an epoch end (a worker restart is timed)" if crosses else ""
    return Bench(name, lambda e: time_loader(loader, e, skip, count, cuda), note)


def measure(benches: list[Bench], repeats: int) -> dict[str, list[float] | str]:
    """Rates per backend; a backend that fails in its warm-up run is reported, not fatal."""
    rates: dict[str, list[float] | str] = {}
    for bench in benches:
        try:
            bench.run(0)  # warm-up: imports, page cache, first worker start, nvJPEG/DALI initialisation
            rates[bench.name] = []
        except Exception as err:
            if bench.name not in OPTIONAL:
                raise
            rates[bench.name] = f"not available: {type(err).__name__}: {err}"
    for r in range(repeats):
        for bench in benches:
            got = rates[bench.name]
            if isinstance(got, list):
                got.append(bench.run(r + 1))
                print(f"  round {r + 1}/{repeats}  {bench.name:<16} {got[-1]:10.1f} img/s", file=sys.stderr)
    return rates


# ---------------------------------------------------------------- report


def to_rows(args: argparse.Namespace, names: list[str], rates: dict[str, list[float] | str],
            notes: dict[str, str]) -> list[Row]:
    medians = {k: statistics.median(v) for k, v in rates.items() if isinstance(v, list) and v}
    rows = []
    for name in names:
        got = rates.get(name)
        med = medians.get(name)
        note = got if isinstance(got, str) else notes.get(name, "")
        ratios = [med / medians[ref] if med is not None and ref in medians else None
                  for ref in ("imagefolder", "ceiling")]
        low, high = (min(got), max(got)) if med is not None else (None, None)
        rows.append(Row(name, args.batch, args.workers, args.crop, args.images, args.repeats, args.batches,
                        med, low, high, *ratios, note))
    return rows


def markdown(rows: list[Row]) -> str:
    columns = ("backend", "workers>", "batch>", "crop>", "images/s (median)>", "min-max>",
               "ratio to imagefolder>", "ratio to ceiling>", "note")
    return table(columns, [(r.backend, r.workers, r.batch, r.crop, fmt(r.images_per_s, ".1f"),
                            "-" if r.min is None else f"{r.min:.1f}-{r.max:.1f}",
                            fmt(r.ratio_to_imagefolder, ".3f"), fmt(r.ratio_to_ceiling, ".3f"), r.note)
                           for r in rows])


def verdicts(rows: list[Row]) -> list[str]:
    ours = next((r for r in rows if r.backend == "webdataset"), None)
    if ours is None:
        return []
    lines = []
    for ref, target in TARGETS.items():
        ratio = getattr(ours, f"ratio_to_{ref}")
        if ratio is not None:
            lines.append(f"webdataset / {ref} = {ratio:.3f} (target >= {target}: "
                         f"{'met' if ratio >= target else 'not met'})")
    medians = {r.backend: r.images_per_s for r in rows if r.images_per_s is not None}
    if ours.images_per_s is not None and "ceiling-parallel" in medians:
        lines.append(f"webdataset / ceiling-parallel = {ours.images_per_s / medians['ceiling-parallel']:.3f} "
                     "(the loader's own overhead, without the machine's multi-core scaling)")
    if "ceiling" in medians and "ceiling-parallel" in medians:
        lines.append(f"ceiling-parallel / ceiling = {medians['ceiling-parallel'] / medians['ceiling']:.3f} "
                     "(how the cores scale together here)")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"machine: {machine()}")
    cache = args.data.expanduser()
    root, train = bench_set(cache, args.images, args.shard_maxcount, args.seed)
    print(f"data: {describe(root, train)}")
    print(f"runs: 1 warm-up + {args.repeats} timed per backend, interleaved; each run drops "
          f"{args.warmup_batches} batches, then times {args.batches} x {args.batch} images; "
          f"RandomResizedCrop({args.crop}, scale=(0.08, 1)) + hflip, uint8 CHW\n")
    names = [b for b in BACKENDS if b in args.backends]
    benches, rates, notes = [], {}, {}
    for name in names:
        try:
            bench = make_bench(name, args, root, train)
        except Unavailable as err:
            rates[name] = str(err) if str(err).startswith("not measured") else f"not available: {err}"
            continue
        benches.append(bench)
        notes[name] = bench.note
    load_before = os.getloadavg()[0]
    rates.update(measure(benches, args.repeats))
    rows = to_rows(args, names, rates, notes)
    print(markdown(rows))
    for line in verdicts(rows):
        print(line)
    print(f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
