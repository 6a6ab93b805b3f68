"""Training throughput of the model alone: models x precision x channels_last x torch.compile.

Every combination is one `launch.train` run with `loader.backend=synthetic` (one random uint8 batch
reused: no input cost), through `benchmarks/train_throughput.py`'s runner, so the number is the
trainer's real step (normalise on the device, autocast, forward, backward, optimizer) and not a
hand-made loop. The first train line of each run (start-up, cuDNN autotuning, compilation) is skipped;
the table gives the median images/s per device over the other lines and, per model, the speed-up of
each combination over fp32 without channels_last or compile, measured in the same session.
Combinations run interleaved over `--repeats` rounds, so drifting load hits them all alike.

On a GPU (the issue's target: ResNet-50, 224 px, bf16, channels_last, at least 3,000 images/s on one
H100; NVIDIA's published A100 figure is 2,470):

    python benchmarks/model_throughput.py --batch 256 --steps 60 --log-every 10

On this project's 2-core CPU VM (what docs/BENCHMARKS.md reports; 224 px, small batches):

    python benchmarks/model_throughput.py --batch 8 --steps 12 --log-every 3 --json /tmp/model.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402
from common import fmt, machine, table  # noqa: E402

MODELS = ("resnet50", "resnet18", "mobilenet_v3_large")
TARGET = ("resnet50", 224, "bf16", True, 3000.0)  # model, crop, precision, channels_last, images/s per GPU


@dataclass(frozen=True)
class Row:
    backend: str
    model: str
    crop: int
    batch: int
    precision: str
    channels_last: bool
    compile: bool
    device: str
    lines_used: int
    images_per_s: float
    min: float
    max: float
    speedup: float | None  # over the same model's fp32, no channels_last, no compile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", nargs="+", default=["off", "on"], choices=("off", "on"))
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"))
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=256, help="loader.batch_size")
    p.add_argument("--steps", type=int, default=60, help="trainer.max_steps per run")
    p.add_argument("--log-every", type=int, default=10, help="trainer.log_every; the first line is skipped")
    p.add_argument("--classes", type=int, default=1000, help="classifier outputs (ImageNet-1k: 1000)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all combinations; lines pooled")
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    args = p.parse_args(argv)
    if args.steps < 2 * args.log_every:
        p.error("--steps must be at least 2 x --log-every (the first line is warm-up)")
    return args


def combinations(args: argparse.Namespace) -> list[tuple[str, str, bool, bool]]:
    return [(m, p, c == "on", k == "on") for m, p, c, k in
            itertools.product(args.models, args.precisions, args.channels_last, args.compile)]


def run_args(args: argparse.Namespace, model: str, precision: str, channels_last: bool,
             compiled: bool) -> argparse.Namespace:
    """The namespace `train_throughput.command` expects, for one combination."""
    return argparse.Namespace(model=model, crop=args.crop, batch=args.batch, steps=args.steps,
                              log_every=args.log_every, precision=precision, channels_last=channels_last,
                              compile=compiled, workers=0, shards=None, overrides=args.overrides)


def to_rows(args: argparse.Namespace, used: dict, devices: dict) -> list[Row]:
    rows = []
    for combo, lines in used.items():
        rates = [float(x["images_per_s"]) for x in lines]
        model, precision, channels_last, compiled = combo
        rows.append(Row("synthetic", model, args.crop, args.batch, precision, channels_last, compiled,
                        devices[combo], len(rates), statistics.median(rates), min(rates), max(rates), None))
    base = {r.model: r.images_per_s for r in rows
            if r.precision == "fp32" and not r.channels_last and not r.compile}
    return [Row(**{**asdict(r), "speedup": r.images_per_s / base[r.model] if r.model in base else None})
            for r in rows]


def markdown(rows: list[Row]) -> str:
    columns = ("model", "crop>", "batch>", "precision", "channels_last", "compile", "device", "lines>",
               "images/s (median)>", "min-max>", "speed-up vs fp32 eager>")
    return table(columns, [(r.model, r.crop, r.batch, r.precision, r.channels_last, r.compile, r.device,
                            r.lines_used, f"{r.images_per_s:.1f}", f"{r.min:.1f}-{r.max:.1f}",
                            fmt(r.speedup, ".2f") + ("x" if r.speedup else "")) for r in rows])


def verdict(rows: list[Row]) -> str:
    model, crop, precision, channels_last, target = TARGET
    hits = [r for r in rows if (r.model, r.crop, r.precision, r.channels_last) == (model, crop, precision,
                                                                                    channels_last)]
    if not hits:
        return f"target ({model} {crop} px {precision} channels_last on one GPU): not in this run"
    best = max(hits, key=lambda r: r.images_per_s)
    if not best.device.startswith("cuda"):
        return (f"target ({model} {crop} px {precision} channels_last, >= {target:.0f} images/s on one "
                f"H100): not measured (device {best.device})")
    met = "met" if best.images_per_s >= target else "not met"
    return (f"{model} {crop} px {precision} channels_last: {best.images_per_s:.0f} images/s (target >= "
            f"{target:.0f}: {met})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"machine: {machine()}")
    combos = combinations(args)
    print(f"runs: {len(combos)} combinations x {args.repeats} round(s) x {args.steps} steps of batch "
          f"{args.batch} at {args.crop} px, a train line every {args.log_every}, the first skipped\n")
    used: dict = {c: [] for c in combos}
    devices: dict = {}
    load_before = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="taxotrain-model-"))
    try:
        for r in range(args.repeats):
            for combo in combos:
                run_dir = scratch / f"{'-'.join(map(str, combo))}-{r}"
                cmd = tt.command(run_args(args, *combo), "synthetic", run_dir, None, args.classes)
                lines = tt.train(cmd, run_dir, tt.REPO)
                if len(lines) < 2:
                    sys.exit(f"error: {len(lines)} train line(s); raise --steps or lower --log-every")
                used[combo] += lines[1:]
                devices[combo] = str(tt.recipe(run_dir)["device"])
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = to_rows(args, used, devices)
    print(markdown(rows))
    print(verdict(rows))
    print(f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
