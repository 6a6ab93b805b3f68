"""Goyal et al. (2017) Table 1 / Figure 2 in miniature: batch B vs 8B at the same number of epochs.

Trains the same model on the same shards, in one invocation, under four recipes (each one
`python -m launch.train` subprocess per seed, fresh run_dir each):

- B:               global batch B (loader.batch_size=B, accum 1), lr = --lr, no warmup;
- 8B scaled+warmup: global batch kB emulated on one process by gradient accumulation
                   (loader.batch_size=B, optim.accum_steps=k, so BatchNorm sees B samples, like Goyal's
                   per-GPU BN), linear scaling (lr = k x --lr), gradual warmup from --lr over --warmup
                   epochs (taxotrain's default start factor base_batch/global_batch = 1/k);
- 8B scaled, no warmup: as above, schedule.warmup_epochs=0;
- 8B unscaled:     global batch kB at B's lr (optim.base_lr = --lr / k), no warmup (the lr is not raised,
                   so there is nothing to warm up to).

The lr is set through optim.base_batch=B, optim.base_lr=--lr: then B's lr is --lr, kB's is k x --lr, and
the Goyal warmup starts at B's lr. (With optim.base_batch=kB instead, the default warmup start factor is
kB/kB = 1 and warmup would leave the lr unchanged.) Every run uses schedule.kind=cosine over --epochs.
Reads each run's metrics.jsonl (last "val" line per epoch) and summary.json (derived recipe), prints the
derived lr/global batch per recipe and a markdown table of final val top-1 per seed, mean, top-1 error
and the difference to B.

    python benchmarks/goyal_small.py --shards /tmp/goyal-shards --epochs 5 --seeds 0 1 --jobs 2 \
        --out /tmp/goyal-small [--repo /tmp/taxotrain-head]

(docs/BENCHMARKS.md ran it with --repo pointing at a `git archive` copy of the measured commit.)
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    name: str
    accum: int
    base_lr: float
    warmup_epochs: float


@dataclass(frozen=True)
class Result:
    recipe: Recipe
    seed: int
    val_top1: dict[int, float]  # epoch -> val top-1 (last line per epoch)
    final_train_loss: float
    derived: dict[str, object]  # summary.json recipe/* values
    seconds: float

    @property
    def final_top1(self) -> float:
        return self.val_top1[max(self.val_top1)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--shards", type=Path, default=Path("/tmp/goyal-shards"), help="shards.build output")
    p.add_argument("--out", type=Path, help="parent of the run dirs; new or empty (default: a new temp dir)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch", type=int, default=32, help="B: the small global batch (and every micro-batch)")
    p.add_argument("--k", type=int, default=8, help="the large batch is k x B, by k accumulation steps")
    p.add_argument("--lr", type=float, default=0.05, help="B's lr; linear scaling gives kB k x lr")
    p.add_argument("--warmup", type=float, default=1.0, help="warmup epochs of the scaled+warmup recipe")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--crop", type=int, default=28)
    p.add_argument("--scale", default="[0.35,1.0]", help="data.scale (RandomResizedCrop area range)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of every run (the same for all: thread count changes the numerics)")
    p.add_argument("--keep-checkpoints", action="store_true", help="default: delete each run's checkpoints/")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="checkout whose launch.train runs (default: this one), e.g. a `git archive` snapshot")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides passed to every run")
    return p.parse_args(argv)


def recipes(lr: float, k: int, warmup: float) -> list[Recipe]:
    return [Recipe("B", 1, lr, 0.0),
            Recipe(f"{k}B scaled + warmup", k, lr, warmup),
            Recipe(f"{k}B scaled, no warmup", k, lr, 0.0),
            Recipe(f"{k}B unscaled (B's lr), no warmup", k, lr / k, 0.0)]


def slug(recipe: Recipe, seed: int) -> str:
    name = "".join(c if c.isalnum() else "-" for c in recipe.name.lower())
    return f"{'-'.join(filter(None, name.split('-')))}-s{seed}"


def command(args: argparse.Namespace, recipe: Recipe, seed: int, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launch.train", f"data.shards={args.shards}", f"run_dir={run_dir}",
            "logger.mode=disabled", f"model.name={args.model}", f"data.crop_size={args.crop}",
            f"data.scale={args.scale}", "loader.workers=1", f"loader.batch_size={args.batch}",
            f"optim.accum_steps={recipe.accum}", f"optim.base_batch={args.batch}",
            f"optim.base_lr={recipe.base_lr!r}", "schedule.kind=cosine",
            f"schedule.warmup_epochs={recipe.warmup_epochs}", f"trainer.epochs={args.epochs}",
            f"trainer.seed={seed}", "trainer.log_every=5", *args.overrides]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_one(args: argparse.Namespace, recipe: Recipe, seed: int) -> Result:
    run_dir = args.out / slug(recipe, seed)
    if run_dir.exists():  # launch.train would resume from its checkpoints
        raise SystemExit(f"error: {run_dir} exists; a fresh run_dir is needed")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = command(args, recipe, seed, run_dir)
    start = time.perf_counter()
    with open(f"{run_dir}.log", "w") as log:
        code = subprocess.run(cmd, cwd=args.repo, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{recipe.name} seed {seed}: exit {code}, see {run_dir}.log")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    val = {int(r["epoch"]): float(r["top1"]) for r in rows if r.get("split") == "val"}
    train = [r for r in rows if r.get("split") == "train" and "loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    derived = {k.removeprefix("recipe/"): v for k, v in summary.items() if k.startswith("recipe/")}
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"  done {recipe.name:<34} seed {seed}: val top1 {val[max(val)]:.4f} in {seconds:.0f} s",
          file=sys.stderr, flush=True)
    return Result(recipe, seed, val, float(train[-1]["loss"]), derived, seconds)


def run_all(args: argparse.Namespace, all_recipes: list[Recipe]) -> list[Result]:
    jobs = [(r, s) for s in args.seeds for r in all_recipes]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(lambda job: train_one(args, *job), jobs))


def by_recipe(results: list[Result], recipe: Recipe) -> list[Result]:
    return sorted((r for r in results if r.recipe == recipe), key=lambda r: r.seed)


def recipe_table(results: list[Result], all_recipes: list[Recipe]) -> str:
    lines = ["| recipe | global batch | micro-batch x accum | steps/epoch | peak lr | warmup steps "
             "| warmup start lr |", "|---|---:|---:|---:|---:|---:|---:|"]
    for recipe in all_recipes:
        d = by_recipe(results, recipe)[0].derived
        start = float(d["lr"]) * float(d["warmup_start_factor"]) if int(d["warmup_steps"]) else float("nan")
        lines.append(f"| {recipe.name} | {d['global_batch']} | {d['per_rank_batch']} x {d['accum_steps']} "
                     f"| {d['steps_per_epoch']} | {float(d['lr']):.4g} | {d['warmup_steps']} "
                     f"| {'-' if start != start else f'{start:.4g}'} |")
    return "\n".join(lines)


def result_table(results: list[Result], all_recipes: list[Recipe]) -> str:
    base = statistics.mean(r.final_top1 for r in by_recipe(results, all_recipes[0]))
    lines = ["| recipe | val top-1 per seed | mean top-1 | mean top-1 error | error - B's (pp) "
             "| error / B's | final train loss (mean) |", "|---|---|---:|---:|---:|---:|---:|"]
    for recipe in all_recipes:
        got = by_recipe(results, recipe)
        mean = statistics.mean(r.final_top1 for r in got)
        seeds = ", ".join(f"s{r.seed}: {r.final_top1:.4f}" for r in got)
        loss = statistics.mean(r.final_train_loss for r in got)
        ratio = (1 - mean) / (1 - base) if base < 1 else float("nan")
        lines.append(f"| {recipe.name} | {seeds} | {mean:.4f} | {100 * (1 - mean):.2f}% "
                     f"| {100 * (base - mean):+.2f} | {ratio:.2f} | {loss:.4f} |")
    return "\n".join(lines)


def curve_table(results: list[Result], all_recipes: list[Recipe]) -> str:
    epochs = sorted({e for r in results for e in r.val_top1})
    lines = ["| recipe | " + " | ".join(f"epoch {e + 1}" for e in epochs) + " |",
             "|---|" + "---:|" * len(epochs)]
    for recipe in all_recipes:
        got = by_recipe(results, recipe)
        means = [statistics.mean(r.val_top1[e] for r in got) for e in epochs]
        lines.append(f"| {recipe.name} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.shards / "_info.json").exists():
        sys.exit(f"error: no shards at {args.shards}; build them with\n  python -m shards.build source=demo "
                 f"out={args.shards} shard.maxcount=250")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="goyal-small-"))
    elif args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: {args.out} is not empty; its run dirs would resume, not start afresh")
    args.out.mkdir(parents=True, exist_ok=True)
    all_recipes = recipes(args.lr, args.k, args.warmup)
    print(f"runs: {len(all_recipes)} recipes x seeds {args.seeds}, {args.epochs} epochs, {args.model} at "
          f"{args.crop} px, {args.jobs} at a time with OMP_NUM_THREADS={args.threads}")
    print(f"run dirs and logs: {args.out}; launch.train from {args.repo}")
    print("example command: " + " ".join(command(args, all_recipes[1], args.seeds[0],
                                                 args.out / slug(all_recipes[1], args.seeds[0]))[1:]) + "\n")
    start = time.perf_counter()
    results = run_all(args, all_recipes)
    print(recipe_table(results, all_recipes) + "\n")
    print(result_table(results, all_recipes) + "\n")
    print("Mean val top-1 after each epoch:\n")
    print(curve_table(results, all_recipes) + "\n")
    print(f"total wall time {time.perf_counter() - start:.0f} s "
          f"(per run {statistics.mean(r.seconds for r in results):.0f} s on average)")


if __name__ == "__main__":
    main()
