"""A learning curve: one training run per fraction of the training split, each evaluated.

How much annotation buys how much accuracy: one ordinary, resumable training run per fraction of the
training split, in `run_dir/fraction-0.100` etc. (`data.fraction`: a nested, per-class subset drawn
from each sample's key, `trainer/data/streams.py: in_subset`), then each run's best checkpoint
evaluated on `curve.eval_split` (`trainer/inference/evaluate.py`). The report is
`run_dir/learning_curve.csv` (exact training images per fraction, counted from the shards, and the
metrics), `learning_curve.png` (accuracy vs training images, log x) and `curve.json`.

Locally the runs train one after the other (each with all ranks, under torchrun or srun) and the
report follows; a rerun resumes the finished runs (nothing to redo) and rewrites the report. With
`launcher=slurm` the runs go out as one job array; when they are done, the same command with
`curve.report_only=true` (which always runs here, not on SLURM) writes the report.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from trainer import config as schema
from trainer.data import shardset
from trainer.data.streams import in_subset, read_shard
from trainer.data.transforms import BadSample, parse_label
from trainer.inference import plots
from trainer.inference.config import EvalData, EvaluateConfig
from trainer.inference.evaluate import evaluate
from trainer.jobs.bag import training_part
from trainer.jobs.run import run
from trainer.runtime import distributed
from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_write

log = logging.getLogger(__name__)
CURVE_FILE, CSV_FILE, PLOT_FILE = "curve.json", "learning_curve.csv", "learning_curve.png"
METRICS = ("top1", "top5", "mrr", "balanced_acc", "nll", "ece")
COLUMNS = ("fraction", "run", "train_images", "train_images_per_class_min",
           "train_images_per_class_median", *METRICS, "n")


def run_name(fraction: float) -> str:
    return f"fraction-{fraction:.3f}"


def fraction_config(cfg: schema.CurveRunConfig, fraction: float) -> schema.TrainConfig:
    """The run for one point of the curve: the same recipe and seed on a `fraction` subset."""
    return replace(training_part(cfg), data=replace(cfg.data, fraction=fraction),
                   run_dir=str(Path(cfg.run_dir) / run_name(fraction)))


def describe(cfg: schema.CurveRunConfig) -> dict:
    return {"format": "taxotrain-curve/1", "data": cfg.data.shards, "train_split": cfg.data.train_split,
            "eval_split": cfg.curve.eval_split, "fraction_seed": cfg.data.fraction_seed,
            "runs": [{"fraction": f, "run_dir": run_name(f)} for f in cfg.curve.fractions]}


# ---------------------------------------------------------------- training


def learning_curve(cfg: schema.CurveRunConfig) -> int:
    runs = [fraction_config(cfg, f) for f in cfg.curve.fractions]
    chosen = runs if cfg.curve.only is None else [runs[cfg.curve.only]]
    if distributed.is_main() and not cfg.launcher.dry_run:
        atomic_write(Path(cfg.run_dir) / CURVE_FILE, json.dumps(describe(cfg), indent=1) + "\n")
    if cfg.curve.report_only:
        return _with_group(cfg, lambda: report(cfg, runs))
    if cfg.launcher.kind == schema.LauncherKind.slurm:
        from trainer.jobs import slurm

        for r in chosen:
            slurm.preflight(r)
        code = slurm.submit_array([slurm.for_the_job(r) for r in chosen], slurm.log_folder(cfg))
        if code == 0 and not cfg.launcher.dry_run:
            print("when every task has finished, write the report with the same command and "
                  "curve.report_only=true")
        return code
    return _with_group(cfg, lambda: _train_then_report(cfg, runs, chosen))


def _train_then_report(cfg: schema.CurveRunConfig, runs: list[schema.TrainConfig],
                       chosen: list[schema.TrainConfig]) -> int:
    for r in chosen:  # one after the other; each run uses every rank of this launch
        if distributed.is_main():
            log.info("learning curve: data.fraction=%s into %s", r.data.fraction, r.run_dir)
        code = run(r)
        if code != 0:
            return code  # a stop (75) or failure: the same command resumes the curve from here
    return report(cfg, runs) if cfg.curve.only is None else 0


def _with_group(cfg: schema.CurveRunConfig, body: Callable[[], int]) -> int:
    # one process group for all runs and their evaluation: creating a second one on the same port can hang
    distributed.init(distributed.detect(), cfg.trainer.dist_timeout_s)
    try:
        return body()
    finally:
        distributed.cleanup()


# ---------------------------------------------------------------- the report


def report(cfg: schema.CurveRunConfig, runs: list[schema.TrainConfig]) -> int:
    """Every rank evaluates (each sample once across ranks); rank 0 counts the subsets and writes."""
    env = distributed.detect()
    device = distributed.init(env, cfg.trainer.dist_timeout_s)
    unfinished = [Path(r.run_dir).name for r in runs if not (Path(r.run_dir) / "summary.json").is_file()]
    if unfinished:
        raise ConfigError(f"curve: runs {unfinished} in {cfg.run_dir} have not finished (no summary.json); "
                          "wait for their jobs, or train them with the same command without "
                          "curve.report_only")
    results = []
    for r in runs:
        ecfg = EvaluateConfig(bag=r.run_dir, data=EvalData(cfg.data.shards, cfg.curve.eval_split),
                              batch_size=cfg.loader.batch_size, workers=cfg.loader.workers,
                              dist_timeout_s=cfg.trainer.dist_timeout_s)
        results.append(evaluate(ecfg, env.rank, env.world_size, device)["ensemble"])
    if not distributed.is_main(env):
        return 0
    counts = subset_counts(cfg.data.shards, cfg.data.train_split, cfg.curve.fractions, cfg.data.fraction_seed)
    rows = [row(r.data.fraction, counts[r.data.fraction], metrics) for r, metrics in zip(runs, results)]
    write_report(Path(cfg.run_dir), describe(cfg), rows)
    return 0


def subset_counts(shards: str, split: str, fractions: list[float], seed: int) -> dict[float, list[int]]:
    """Per fraction, the training images kept per class: one pass over the split's shards reading only
    keys and `.cls` (nothing is decoded or unpickled). Samples without a valid label are not counted:
    training replaces them as unusable."""
    split_set = shardset.load(shards, split)
    counts = {f: [0] * split_set.num_classes for f in fractions}
    for shard in split_set.shards:
        for sample in read_shard(shard):
            try:
                label = parse_label(sample.get("cls"), split_set.num_classes)
            except BadSample:
                continue
            for f in fractions:
                counts[f][label] += in_subset(seed, sample["__key__"], f)
    return counts


def row(fraction: float, per_class: list[int], metrics: dict) -> dict:
    return {"fraction": fraction, "run": run_name(fraction), "train_images": sum(per_class),
            "train_images_per_class_min": min(per_class),
            "train_images_per_class_median": statistics.median(per_class),
            **{k: metrics[k] for k in METRICS}, "n": metrics["n"]}


def write_report(out: Path, described: dict, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / CSV_FILE, text.getvalue())
    plots.learning_curve_png(out / PLOT_FILE, rows, described["eval_split"])
    # NaN (e.g. the balanced accuracy of a split missing a class) is written as null, not as invalid JSON
    clean = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in rows]
    atomic_write(out / CURVE_FILE, json.dumps({**described, "results": clean}, indent=1) + "\n")
    print(f"learning curve: {out / CSV_FILE}, {out / PLOT_FILE}")
    for r in rows:
        print(f"  fraction {r['fraction']:<6} {r['train_images']:>9} images  top1 {r['top1']:.4f}  "
              f"balanced {r['balanced_acc']:.4f}")
