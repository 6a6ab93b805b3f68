"""Training throughput (images/s) of `launch.train` per loader backend and rank count, side by side.

Runs `python -m launch.train` for `--steps` optimizer steps (`trainer.max_steps`) per backend and reads
its `metrics.jsonl`: every `--log-every` steps a "train" line carries images_per_s (global, over that
interval) and data_wait (fraction of the interval spent waiting for the next batch). The first line holds
the start-up (DataLoader workers, first allocations, cuDNN autotuning) and is skipped; the table gives
the median and min-max of the remaining lines.

- `--backend synthetic`: `loader.backend=synthetic`, random uint8 images made once and reused, so the number
  is the model's forward/backward/optimizer step plus the loop's own overhead, with no input cost.
- `--backend webdataset`: the same loop reading `--shards` (decode + RandomResizedCrop in
  `--workers` DataLoader processes), without validation.
- `--backend dali-cpu` / `dali-gpu`: `loader.backend=dali` with `--workers` DALI threads.
- `--backend torchvision-gpu`: `loader.backend=torchvision-gpu` (nvJPEG in the training process; GPU only).
- Several backends (`both` = synthetic webdataset) run interleaved; the synthetic run gets the shards'
  class count and sample count, so runs differ only in where batches come from, and the table adds each
  backend's ratio to synthetic: the fraction of the model's speed that the data path delivers.
- `--nproc 1 2` repeats every backend with 1 and 2 ranks under `torchrun --standalone` (gloo on CPU, NCCL
  on GPUs): images/s in total and per rank, a first scaling figure.

Precision `auto` is bf16 on a GPU and fp32 on a CPU. GPU reference (ResNet-50, 224 px, 64 per GPU):

    python benchmarks/train_throughput.py --model resnet50 --crop 224 --batch 64 --steps 120 --log-every 20 \
        --precision auto --backend synthetic

CPU check and the data-loading comparison on the demo shards (what docs/BENCHMARKS.md reports):

    python benchmarks/train_throughput.py --model resnet18 --crop 64 --batch 16 --steps 30 --log-every 5 \
        --backend synthetic
    python benchmarks/train_throughput.py --model resnet18 --crop 28 --batch 64 --steps 60 --log-every 10 \
        --backend both --shards /tmp/goyal-shards --workers 1
    python benchmarks/train_throughput.py --model resnet18 --crop 28 --batch 64 --steps 60 --log-every 10 \
        --backend synthetic webdataset dali-cpu --shards /tmp/goyal-shards --workers 1 --nproc 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, machine, table  # noqa: E402

BACKENDS = ("synthetic", "webdataset", "dali-cpu", "dali-gpu", "torchvision-gpu")


@dataclass(frozen=True)
class Row:
    backend: str
    model: str
    crop: int
    batch: int
    precision: str
    device: str
    ranks: int
    lines_used: int
    images_per_s: float
    min: float
    max: float
    data_wait: float
    ratio_to_synthetic: float | None
    images_per_s_per_rank: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=64, help="loader.batch_size (per rank)")
    p.add_argument("--steps", type=int, default=120, help="trainer.max_steps")
    p.add_argument("--log-every", type=int, default=20, help="trainer.log_every; the first line is skipped")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--backend", nargs="+", default=["synthetic"], choices=BACKENDS + ("both",),
                   help="one or more; `both` = synthetic webdataset. The ratio column is to synthetic")
    p.add_argument("--shards", type=Path, help="shards.build output (every backend but synthetic)")
    p.add_argument("--nproc", type=int, nargs="+", default=[1],
                   help="ranks per run (torchrun --standalone; gloo on CPU): a scaling figure with 1 2")
    p.add_argument("--workers", type=int, default=4, help="loader.workers")
    p.add_argument("--classes", type=int, default=1000, help="synthetic backend alone: classifier outputs")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="model.compile=true")
    p.add_argument("--repeats", type=int, default=1, help="runs per backend, interleaved; lines pooled")
    p.add_argument("--keep", action="store_true", help="keep the run dirs (default: deleted)")
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="checkout whose launch.train runs (default: this one), e.g. a `git archive` snapshot")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    return p.parse_args(argv)


def shard_counts(shards: Path) -> tuple[int, int]:
    """(train samples, classes) from the manifest written by shards.build."""
    info = json.loads((shards / "_info.json").read_text())
    train = info["splits"]["train"]
    return int(train["num_samples"]), len((shards / "classes.txt").read_text().split())


def command(args: argparse.Namespace, backend: str, run_dir: Path, samples: int | None,
            classes: int, ranks: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "launch.train"] if ranks == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={ranks}",
        "-m", "launch.train"]
    cmd = [*launcher, f"run_dir={run_dir}", "logger.mode=disabled",
           f"model.name={args.model}", f"data.crop_size={args.crop}", f"loader.batch_size={args.batch}",
           f"loader.workers={args.workers}", f"trainer.max_steps={args.steps}",
           f"trainer.log_every={args.log_every}", f"trainer.precision={args.precision}",
           f"model.channels_last={str(args.channels_last).lower()}",
           f"model.compile={str(args.compile).lower()}"]
    if backend == "synthetic":
        cmd += ["loader.backend=synthetic", "data.shards=none", f"data.synthetic_classes={classes}"]
        cmd += [f"data.synthetic_samples={samples}"] if samples else []
    else:
        cmd += [f"data.shards={args.shards}", "data.val_split=null"]
    if backend.startswith("dali"):  # DALI threads stand in for DataLoader workers
        cmd += ["loader.backend=dali", f"loader.dali.device={backend.split('-')[1]}",
                f"loader.dali.threads={max(1, args.workers)}"]
    if backend == "torchvision-gpu":
        cmd += ["loader.backend=torchvision-gpu"]
    return cmd + list(args.overrides)


def train(cmd: list[str], run_dir: Path, repo: Path) -> list[dict]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: exit {done.returncode} from {' '.join(cmd[1:])}\n{done.stdout[-3000:]}"
                 f"{done.stderr[-3000:]}")
    print(f"  {' '.join(cmd[1:])}\n  -> {time.perf_counter() - start:.0f} s", file=sys.stderr)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("split") == "train" and "images_per_s" in x]


def recipe(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k.removeprefix("recipe/"): v for k, v in summary.items() if k.startswith("recipe/")}


def to_row(args: argparse.Namespace, backend: str, ranks: int, used: list[dict], derived: dict) -> Row:
    rates = [float(x["images_per_s"]) for x in used]  # global: every rank's images
    wait = statistics.median(float(x["data_wait"]) for x in used)
    median = statistics.median(rates)
    return Row(backend, args.model, args.crop, args.batch, str(derived["precision"]), str(derived["device"]),
               ranks, len(used), median, min(rates), max(rates), wait, None, median / ranks)


def markdown(rows: list[Row]) -> str:
    columns = ("backend", "model", "crop>", "batch>", "precision", "device", "ranks>", "lines used>",
               "images/s (median)>", "min-max>", "per rank>", "data_wait (median)>", "ratio to synthetic>")
    return table(columns, [(r.backend, r.model, r.crop, r.batch, r.precision, r.device, r.ranks,
                            r.lines_used, f"{r.images_per_s:.1f}", f"{r.min:.1f}-{r.max:.1f}",
                            f"{r.images_per_s_per_rank:.1f}", f"{100 * r.data_wait:.1f}%",
                            fmt(r.ratio_to_synthetic, ".3f")) for r in rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.steps < 2 * args.log_every:
        sys.exit("error: --steps must be at least 2 x --log-every (the first line is warm-up)")
    chosen = [b for x in args.backend for b in (("synthetic", "webdataset") if x == "both" else (x,))]
    backends = sorted(set(chosen), key=BACKENDS.index)  # synthetic first: the ratios' base
    samples, classes = None, args.classes
    if backends != ["synthetic"]:
        if args.shards is None or not (args.shards / "_info.json").exists():
            sys.exit("error: every backend but synthetic needs --shards DIR (a shards.build output)")
        samples, classes = shard_counts(args.shards)
    print(f"machine: {machine()}")
    print(f"runs: {args.repeats} x {args.steps} steps per backend, a train line every {args.log_every}, "
          f"the first of each run skipped; channels_last={args.channels_last}, workers={args.workers}\n")
    runs = [(b, n) for n in args.nproc for b in backends]
    used: dict[tuple[str, int], list[dict]] = {run: [] for run in runs}
    derived: dict[tuple[str, int], dict] = {}
    load_before = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="taxotrain-throughput-"))
    try:
        for r in range(args.repeats):  # backends interleaved, so drifting load hits them all alike
            for backend, ranks in runs:
                run_dir = scratch / f"{backend}-{ranks}-{r}"
                cmd = command(args, backend, run_dir, samples, classes, ranks)
                lines = train(cmd, run_dir, args.repo)
                if len(lines) < 2:
                    sys.exit(f"error: {len(lines)} train line(s); raise --steps or lower --log-every")
                used[(backend, ranks)] += lines[1:]  # the first line holds the start-up
                derived[(backend, ranks)] = recipe(run_dir)
        rows = [to_row(args, b, n, used[(b, n)], derived[(b, n)]) for b, n in runs]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    base = {r.ranks: r.images_per_s for r in rows if r.backend == "synthetic"}
    rows = [Row(**{**asdict(r), "ratio_to_synthetic": r.images_per_s / base[r.ranks]}) if r.ranks in base
            else r for r in rows]
    print(markdown(rows))
    print(f"\n1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"(above ~0 on an idle machine: other processes shared the cores)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
