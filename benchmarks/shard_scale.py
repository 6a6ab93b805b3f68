"""Issue 18: one array task's peak memory and time against the size of the collection, a partitioned
build (`partition=true`) beside the build that plans the whole collection in every task; and how mixed
the shards of each are.

    python benchmarks/shard_scale.py [--inputs 10000 100000 1000000] [--share 10000] [--work DIR]

Inputs: a CSV manifest of N rows (EcoTaxa-like object ids, 20 classes), every row pointing at one of
16 real tiny PNGs, so that N can grow without N files. For each N, the array has N / share tasks and
task 0 runs as its own process (`python -m shards.build ... stage=write`), measured by `os.wait4`:
  whole        the default build: every task lists and plans all N inputs, then writes its 1/T of the shards;
  partitioned  partition=true split.method=key_hash: the task lists the rows of its share only.
Both write about `share` images. The mixing table plans (no writing) the 100k collection both ways with
1,000-image shards and gives the mean total-variation distance between each shard's class histogram and
the collection's, beside what a uniform random sample of that size gives (the floor).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import REPO, machine, table
from PIL import Image

from shards.build import plan
from shards.config import CsvSource, ShardConfig, ShardSizeConfig, SplitConfig

CLASSES = 20
FILES = 16


def manifest(work: Path, n: int) -> Path:
    images = work / "images"
    if not images.exists():
        images.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(FILES):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    path = work / f"objects-{n}.csv"
    if not path.exists():
        rng = np.random.default_rng(n)
        # a long tail, as in plankton: class c has weight 1 / (c + 1)
        weights = 1.0 / np.arange(1, CLASSES + 1)
        labels = rng.choice(CLASSES, size=n, p=weights / weights.sum())
        with path.open("w") as fh:
            fh.write("object_id,path,label\n")
            fh.writelines(f"obj{i},images/{i % FILES}.png,class{labels[i]:02d}\n" for i in range(n))
    return path


# A small Python in between: Linux carries a process's peak RSS across exec, so a child forked straight
# from this benchmark (torch imported) would report this process's peak, not its own.
PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def run_task(table_path: Path, out: Path, tasks: int, partitioned: bool) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of task 0 of `tasks`, a process of its own."""
    args = [sys.executable, "-m", "shards.build", "source=csv", f"source.path={table_path}",
            "source.key_column=object_id", f"out={out}", "stage=write", "task_index=0",
            f"task_count={tasks}", "progress=false", "shard.maxcount=1000"]
    if partitioned:
        args += ["partition=true", "split.method=key_hash"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def scale_rows(work: Path, sizes: list[int], share: int) -> list[list[object]]:
    rows = []
    for n in sizes:
        table_path = manifest(work, n)
        tasks = max(1, n // share)
        cells: list[object] = [f"{n:,}", tasks]
        for partitioned in (False, True):
            out = work / f"out-{n}-{'p' if partitioned else 'w'}"
            seconds, rss = run_task(table_path, out, tasks, partitioned)
            cells += [f"{seconds:.1f}", f"{rss:.0f}"]
        rows.append(cells)
    return rows


def _tv(counts: Counter, overall: np.ndarray) -> float:
    hist = np.array([counts[c] for c in range(CLASSES)], dtype=float)
    return 0.5 * float(np.abs(hist / hist.sum() - overall).sum())


def mixing_rows(work: Path, n: int, tasks: int) -> list[list[object]]:
    table_path = manifest(work, n)
    source = CsvSource(path=str(table_path), key_column="object_id")
    size = ShardSizeConfig(maxcount=1000)
    rows = []
    for partitioned in (False, True):
        plans = []
        for task in range(tasks if partitioned else 1):
            cfg = ShardConfig(source=source, out=str(work / "unused"), shard=size, partition=partitioned,
                              task_index=task, task_count=tasks if partitioned else 1,
                              split=SplitConfig(method="key_hash" if partitioned else "stratified"))
            plans += plan(cfg, work)[1]
        train = [p for p in plans if p.split == "train" and len(p.items) == size.maxcount]
        labels = [[it.label for it in p.items] for p in train]
        overall = np.bincount(np.concatenate(labels), minlength=CLASSES) / sum(map(len, labels))
        tv = [_tv(Counter(ls), overall) for ls in labels]
        rng = np.random.default_rng(0)
        floor = [_tv(Counter(rng.choice(CLASSES, size.maxcount, p=overall)), overall) for _ in train]
        rows.append([f"partitioned, {tasks} tasks" if partitioned else "whole", len(train),
                     f"{np.mean(tv):.4f}", f"{np.max(tv):.4f}", f"{np.mean(floor):.4f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--share", type=int, default=10_000)
    parser.add_argument("--mixing", type=int, default=100_000, help="inputs of the mixing table (0: none)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shard-scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(machine())
    print(table(["inputs>", "tasks>", "whole: task 0 s>", "whole: peak RSS MiB>", "partitioned: task 0 s>",
                 "partitioned: peak RSS MiB>"], scale_rows(args.work, args.inputs, args.share)))
    if args.mixing:
        print()
        print(table(["build", "train shards>", "mean TV to the collection>", "max TV>",
                     "random sample's mean TV>"],
                    mixing_rows(args.work, args.mixing, max(1, args.mixing // args.share))))


if __name__ == "__main__":
    main()
