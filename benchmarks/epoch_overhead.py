"""Fixed cost per epoch (issue 18): what a training epoch costs beyond its steps, old behaviour beside new.

On a set so small that an epoch is a few steps, the cost of an epoch is mostly what happens around the
steps: DataLoader workers started and stopped (training, then validation), and the epoch-end checkpoint
(90 MB for ResNet-18 with SGD momentum) serialised, hashed, written and fsynced. Each run trains
`--epochs` epochs in a fresh process (`Trainer` in-process there, so the steps can be timed) and reports

    overhead per epoch = (wall time of fit() - time the steps themselves take) / epochs

where the steps themselves are the model's work: the optimizer steps (`Trainer._optimizer_step`:
forward, backward, update), counted as their number x the median step time, and the forwards of
validation. The median, because a background checkpoint write slows the steps it overlaps where cores
are few (it competes for them): that slowdown is the save's cost, so it counts as overhead, as do
waiting for batches (worker start, and with `--workers 0` the decoding itself), the validation loader,
the checkpoint on the critical path, logging. Modes:

- `old`: `loader.persistent_workers=false trainer.checkpoint_async=false` (the behaviour before: new
  workers every epoch and every validation, every save on the critical path);
- `persistent`: only the workers new (`trainer.checkpoint_async=false`): their share of the change;
- `new`: the defaults (workers for the whole run, epoch-end saves written by a background thread);
- `spaced`: `new` with `trainer.checkpoint_every_s=3600` (only the last epoch and better best metrics save).

The shard set is `--images` generated PNGs (4 classes, 32 px) through `shards.build` (80/10/10 split:
64 images give 48 training and 8 validation images, near the issue's 51-image set). Runs are interleaved
over `--repeats`, so drifting load hits every mode alike; the table gives the mean and min-max over the
repeats.

    python benchmarks/epoch_overhead.py --workers 0 1 2 --repeats 3
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
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

MODES = {
    "old": ["loader.persistent_workers=false", "trainer.checkpoint_async=false"],
    "persistent": ["trainer.checkpoint_async=false"],
    "new": [],
    "spaced": ["trainer.checkpoint_every_s=3600"],
}
CLASSES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="loader.workers values")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="runs per (workers, mode), interleaved")
    p.add_argument("--images", type=int, default=64, help="generated images (80%% train)")
    p.add_argument("--model", default="resnet18", help="resnet18: a 90 MB checkpoint with SGD momentum")
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--data", type=Path, help="folder for the images and shards (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, in a child process
    return p.parse_args(argv)


# ---------------------------------------------------------------- the shard set


def make_shards(root: Path, count: int) -> Path:
    """`count` 32 px PNGs in class folders, through `shards.build`; reused when already built."""
    out = root / f"shards-{count}"
    if (out / "_info.json").is_file():
        return out
    from PIL import Image

    from shards.build import build
    from shards.config import ImageFolderSource, ShardConfig

    images, rng = root / f"images-{count}", np.random.default_rng(0)
    for i in range(count):
        label = i % CLASSES
        pixels = rng.integers(0, 128, (32, 32, 3), dtype=np.uint8)
        pixels[..., label % 3] += 100  # a class is a brighter channel (and the 4th a darker image)
        folder = images / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels // (2 if label == 3 else 1)).save(folder / f"img{i:05d}.png")
    with contextlib.redirect_stdout(io.StringIO()):  # build() prints a summary; keep the table clean
        build(ShardConfig(source=ImageFolderSource(root=str(images)), out=str(out), progress=False))
    return out


# ---------------------------------------------------------------- one run (child process)


def one_run(spec: dict) -> dict:
    """Trains `spec` in this process and times fit(), the steps and the validation forwards."""
    import torch
    from omegaconf import OmegaConf

    from trainer.config import TrainConfig
    from trainer.loop import Trainer
    from trainer.runtime.cli import typed
    from trainer.runtime.distributed import DistEnv

    cfg = typed(TrainConfig, OmegaConf.from_dotlist(spec["overrides"]))
    trainer = Trainer(cfg, DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "single"))
    cuda = trainer.device.type == "cuda"
    spent = {"steps": 0.0, "val_forward": 0.0, "fetch": 0.0, "epoch_end": 0.0}
    step_times: list[float] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(name: str, method):
        def run(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - start
                if name == "steps":
                    step_times.append(time.perf_counter() - start)
        return run

    trainer._optimizer_step = timed("steps", trainer._optimizer_step)
    trainer._next_step = timed("fetch", trainer._next_step)
    trainer._end_epoch = timed("epoch_end", trainer._end_epoch)
    started: list[float] = []

    def before(module, _):
        if not module.training:
            sync()
            started.append(time.perf_counter())

    def after(module, _, __):
        if not module.training:
            sync()
            spent["val_forward"] += time.perf_counter() - started.pop()

    trainer.net.register_forward_pre_hook(before)
    trainer.net.register_forward_hook(after)
    code = 1
    try:
        start = time.perf_counter()
        code = trainer.fit()
        wall = time.perf_counter() - start
    finally:
        trainer.close(code)
    epochs = trainer.epoch
    model = statistics.median(step_times) * len(step_times) + spent["val_forward"]
    return {"wall": wall, "epochs": epochs, "steps": trainer.step, "model": model,
            "steps_measured": spent["steps"], "overhead_per_epoch": (wall - model) / epochs,
            "fetch": spent["fetch"],
            "epoch_end_besides_val_forward": spent["epoch_end"] - spent["val_forward"]}


def run_child(shards: Path, run_dir: Path, args: argparse.Namespace, workers: int, mode: str) -> dict:
    overrides = [f"data.shards={shards}", f"run_dir={run_dir}", "logger.mode=disabled",
                 f"model.name={args.model}", f"data.crop_size={args.crop}", f"loader.batch_size={args.batch}",
                 f"loader.workers={workers}", f"trainer.epochs={args.epochs}", "trainer.log_every=1000",
                 "loader.pin_memory=false", "data.check=size", "schedule.warmup_epochs=0", *MODES[mode]]
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps({"overrides": overrides})],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: exit {done.returncode} from workers={workers} mode={mode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- table


def filesystem(path: Path) -> str:
    """The type of the filesystem the checkpoints go to (`df -T`): it decides what an fsync costs."""
    done = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True)
    lines = done.stdout.split("\n")
    return lines[1].split()[1] if done.returncode == 0 and len(lines) > 1 else "unknown filesystem"


def summarise(results: dict[tuple[int, str], list[dict]]) -> list[dict]:
    rows = []
    for (workers, mode), runs in results.items():
        over = [r["overhead_per_epoch"] for r in runs]
        rows.append({"workers": workers, "mode": mode, "runs": len(runs), "epochs": runs[0]["epochs"],
                     "steps": runs[0]["steps"],
                     "wall_per_epoch": statistics.fmean(r["wall"] / r["epochs"] for r in runs),
                     "model_per_epoch": statistics.fmean(r["model"] / r["epochs"] for r in runs),
                     "steps_measured_per_epoch": statistics.fmean(r["steps_measured"] / r["epochs"]
                                                                  for r in runs),
                     "overhead_per_epoch": statistics.fmean(over), "min": min(over), "max": max(over),
                     "fetch_per_epoch": statistics.fmean(r["fetch"] / r["epochs"] for r in runs),
                     "epoch_end_per_epoch": statistics.fmean(r["epoch_end_besides_val_forward"] / r["epochs"]
                                                             for r in runs)})
    return rows


def markdown(rows: list[dict]) -> str:
    columns = ("loader.workers>", "mode", "runs>", "wall s/epoch>", "model s/epoch>", "overhead s/epoch>",
               "min-max>", "steps as timed>", "batch wait>", "epoch end (save, val loader)>")
    return table(columns, [(r["workers"], r["mode"], r["runs"], f"{r['wall_per_epoch']:.2f}",
                            f"{r['model_per_epoch']:.2f}", f"{r['overhead_per_epoch']:.2f}",
                            f"{r['min']:.2f}-{r['max']:.2f}", f"{r['steps_measured_per_epoch']:.2f}",
                            f"{r['fetch_per_epoch']:.2f}",
                            f"{r['epoch_end_per_epoch']:.2f}") for r in rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    scratch = Path(tempfile.mkdtemp(prefix="taxotrain-epoch-overhead-"))
    shards = make_shards(args.data or scratch, args.images)
    info = json.loads((shards / "_info.json").read_text())["splits"]
    print(f"machine: {machine()}; checkpoints on {filesystem(scratch)}")
    print(f"set: {info['train']['num_samples']} training and {info['val']['num_samples']} validation images "
          f"(32 px PNG, {CLASSES} classes); {args.model}, crop {args.crop}, batch {args.batch}, "
          f"{args.epochs} epochs per run, {args.repeats} run(s) per row, interleaved\n")
    load_before = os.getloadavg()[0]
    results: dict[tuple[int, str], list[dict]] = {(w, m): [] for w in args.workers for m in args.modes}
    for repeat in range(args.repeats):
        for workers, mode in results:
            run_dir = scratch / f"run-{workers}-{mode}-{repeat}"
            result = run_child(shards, run_dir, args, workers, mode)
            results[(workers, mode)].append(result)
            shutil.rmtree(run_dir)  # 3 x 90 MB of checkpoints each
            print(f"  workers={workers} {mode}: {result['wall']:.1f} s", file=sys.stderr)
    if args.data is None:
        shutil.rmtree(scratch)
    rows = summarise(results)
    print(markdown(rows))
    print(f"\nmodel = optimizer steps x their median time + validation forwards; overhead = (wall - model) "
          "/ epochs; steps as timed: their sum, slowed where a background write shared the cores; batch "
          "wait and epoch end (besides validation forwards) are parts of the overhead as timed. 1-min load "
          f"average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other processes shared the "
          "cores where it is above ~0)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
