"""Where one DataLoader worker of the `webdataset` backend spends its time, per image.

Runs one epoch of the training stream (`trainer.data.TrainStream` + `ShardLoader`, as `trainer/loop.py`
builds it) over the loader benchmark's JPEG shards, with `--workers` workers, and has every worker
report, per image:

- `busy`: the time it spent making batches (not waiting for the training process to take one);
- `prepare`: decode + augmentation (`TrainStream._prepare`): the work the ceiling loop of
  `benchmarks/loader.py` also does;
- `assemble`: stacking the batch (`TrainStream._assemble`);
- `rest`: everything else the worker's loop does before it hands the batch over: reading the shard
  at the index offsets, the shuffle buffer, seeds and labels;
- `cpu`: the worker's CPU time, all its threads: also the DataLoader queue thread that copies each
  batch into shared memory for the training process;
- `faults`: minor page faults (fresh memory the kernel had to map in).

The overhead of a worker over the ceiling is `1 - prepare / busy`: a ratio inside one process, so it
holds up on a noisy machine better than images/s across runs do.

    python benchmarks/worker_profile.py [--workers 1] [--batch 64] [--epochs 3] [--images 2000] [--data DIR]

The JPEGs and shards are `benchmarks/loader.py`'s, generated on first use and shared with it.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common import machine  # noqa: E402
from loader import CACHE, bench_set  # noqa: E402

from trainer.data.streams import Batch, ShardLoader, StreamConfig, TrainStream, steps_per_epoch  # noqa: E402
from trainer.data.transforms import AugmentConfig, train_transform  # noqa: E402

FIELDS = ("busy", "prepare", "assemble", "rest", "cpu", "faults")


class ProfiledStream(TrainStream):
    """`TrainStream` that times its own parts and puts one report per worker on `reports`."""

    def __init__(self, *args, reports: mp.Queue, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reports = reports

    def _batches(self, logical: int, remaining: int, skip: int) -> Iterator[Batch]:
        self.prep = self.asm = 0.0
        self.images = 0
        busy, cpu0, faults0 = 0.0, time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        resumed = time.perf_counter()
        for batch in super()._batches(logical, remaining, skip):
            busy += time.perf_counter() - resumed  # time spent making this batch, not waiting to hand it over
            yield batch
            resumed = time.perf_counter()
        n = max(1, self.images)
        self.reports.put({"busy": busy / n, "prepare": self.prep / n, "assemble": self.asm / n,
                          "rest": (busy - self.prep - self.asm) / n, "cpu": (time.process_time() - cpu0) / n,
                          "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / n})

    def _prepare(self, sample: dict, seed: int):
        t = time.perf_counter()
        try:
            return super()._prepare(sample, seed)
        finally:
            self.prep += time.perf_counter() - t
            self.images += 1

    def _assemble(self, *args) -> Batch:
        t = time.perf_counter()
        batch = super()._assemble(*args)
        self.asm += time.perf_counter() - t
        return batch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="epochs, one report per worker each (default 3)")
    p.add_argument("--images", type=int, default=2000, help="as in benchmarks/loader.py (default 2000)")
    p.add_argument("--data", type=Path, default=CACHE)
    p.add_argument("--shard-maxcount", type=int, default=100)
    args = p.parse_args(argv)
    if args.workers < 1 or args.batch < 1 or args.epochs < 1:
        p.error("--workers, --batch and --epochs must be >= 1")

    _, train = bench_set(args.data, args.images, args.shard_maxcount, 0)
    reports: mp.Queue = mp.get_context("fork").Queue()
    per_epoch = steps_per_epoch(train.num_samples, args.batch, 1, 1)
    stream = ProfiledStream(train, train_transform(AugmentConfig()), StreamConfig(args.batch, 0), rank=0,
                            world=1, workers=args.workers, batches_per_epoch=per_epoch, reports=reports)
    loader = ShardLoader(stream, args.workers)
    got, rates = [], []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        images = sum(len(b.labels) for b in loader.epoch(epoch))
        rates.append(images / (time.perf_counter() - start))
        got += [reports.get(timeout=60) for _ in range(args.workers)]

    print(f"machine: {machine()}")
    print(f"{args.epochs} epochs x {per_epoch} batches of {args.batch}, {args.workers} worker(s); "
          f"per image, mean over {len(got)} worker-epochs (busy = prepare + assemble + rest):\n")
    mean = {k: statistics.fmean(r[k] for r in got) for k in FIELDS}
    print("| " + " | ".join(f"{k} (us)" if k != "faults" else k for k in FIELDS) + " | overhead |")
    print("|" + "---:|" * (len(FIELDS) + 1))
    print("| " + " | ".join(f"{mean[k] * 1e6:.0f}" if k != "faults" else f"{mean[k]:.0f}" for k in FIELDS)
          + f" | {1 - mean['prepare'] / mean['busy']:.3f} |")
    print(f"\nloader: {statistics.median(rates):.1f} images/s (median of {len(rates)} epochs, the first "
          "with the workers' start); overhead = 1 - prepare / busy")


if __name__ == "__main__":
    main()
