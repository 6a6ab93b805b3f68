"""Issue 18: what the shard check costs a training start, against the number of shards, with and without
the stamps a first start leaves (`trainer/data/shardset.py`).

    python benchmarks/startup_check.py [--shards 20 200 2000] [--mib 1] [--repeats 3]

For each count, files of `--mib` MiB of random bytes stand in for shards (the check reads bytes, not
tar structure), recorded as a manifest would record them. Timed side by side in one run, each the median
of `--repeats` (page cache warm after the first read, as on a node that restarts a job):
  first start  data.check=sha256 without stamps: every file hashed;
  requeue      data.check=sha256 with the stamps the first start wrote: one stat per file;
  size         data.check=size: one stat per file, no digest.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, table

from trainer.data import shardset


def make(root: Path, count: int, size: int) -> list[shardset.Shard]:
    shards = []
    for i in range(count):
        path = root / f"train-{i:06d}.tar"
        data = os.urandom(size)
        path.write_bytes(data)
        shards.append(shardset.Shard(path, 10, size, hashlib.sha256(data).hexdigest()))
    return shards


def timed(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def first_start(shards: list[shardset.Shard], stamp: Path) -> None:
    stamp.unlink(missing_ok=True)
    shardset.check_across_ranks(shards, "sha256", 0, 1, stamp)


def measure(root: Path, count: int, mib: float, repeats: int) -> list[object]:
    shards = make(root, count, int(mib * 2**20))
    stamp = root / shardset.STAMP_FILE
    cold = timed(lambda: first_start(shards, stamp), repeats)
    warm = timed(lambda: shardset.check_across_ranks(shards, "sha256", 0, 1, stamp), repeats)
    size = timed(lambda: shardset.check(shards, "size"), repeats)
    return [count, f"{count * mib:.0f}", f"{cold:.3f}", f"{warm:.4f}", f"{size:.4f}", f"{cold / warm:.0f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--mib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    rows = []
    for count in args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(Path(tmp), count, args.mib, args.repeats))
    print(table(["shards>", "MiB>", "first start s>", "requeue (stamps) s>", "size s>",
                 "first / requeue>"], rows))


if __name__ == "__main__":
    main()
