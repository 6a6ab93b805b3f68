"""Evaluate a bag on a labelled split: each member and the ensemble, with reports and plots.

Loads every member of a bag (`bag.json`) or a single run directory (`trainer/members.py`), runs
them on the same batches, optionally with test-time augmentation (`tta=hflip|fivecrop|tencrop`),
combines their probabilities (`combine=mean|geometric`), applies the bag's calibration
(`scoring.py`; `calibration=none` turns it off) and writes into the bag directory (or `out=DIR`):
`report.json`, `report.md`, `per_class.csv`, `confusion.png`, `reliability.png` and
`precision_coverage.png` (automatic acceptance: `acceptance.py`); with `logger.mode=offline|online`
also to W&B. Runs in-process, under torchrun or as srun tasks:
every sample is evaluated exactly once across ranks and the sums are reduced at the end.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.data import shardset
from trainer.data import streams as data
from trainer.inference import acceptance, frequency
from trainer.inference import plots as plots_mod
from trainer.inference.config import EvaluateConfig
from trainer.inference.confusion import Confusion
from trainer.inference.ensemble import ProbabilityMetrics
from trainer.inference.members import augment_config, input_transform, load_bag
from trainer.inference.scoring import ENSEMBLE, Scorer, calibration_path, load_calibration
from trainer.runtime import distributed, lock, logfile, progress
from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_write
from trainer.tracking.tracker import jsonable

if TYPE_CHECKING:
    from trainer.inference.wandb_report import SampleCollector

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("top1", "top5", "mrr", "balanced_acc", "macro_top5", "nll", "ece", "n")
FILES = {"json": "report.json", "md": "report.md", "csv": "per_class.csv", "confusion": "confusion.png",
         "reliability": "reliability.png", "coverage": "precision_coverage.png",
         "recall": "recall_vs_count.png"}




@torch.no_grad()
def evaluate(cfg: EvaluateConfig, rank: int, world: int, device: torch.device,
             samples: SampleCollector | None = None) -> dict:
    """The report (see `FILES`) as a dict; the same on every rank. `samples` (on every rank or none)
    collects W&B's sample predictions, merged on rank 0."""
    members = load_bag(cfg.bag, cfg.members, cfg.checkpoint, device)
    scorer = Scorer(members, cfg.tta, cfg.combine,
                    load_calibration(cfg.bag, cfg.calibration, members, cfg.tta, cfg.combine))
    split = shardset.load(cfg.data.shards, cfg.data.split)
    shardset.check_across_ranks(split.shards, cfg.data.check, rank, world)  # a flipped label byte shows
    if members[0].classes != list(split.classes):
        raise ConfigError(f"the bag was trained on other classes than {cfg.data.shards} has")
    unknown = sorted(set(cfg.exclude_classes) - set(split.classes))
    if unknown:
        raise ConfigError(f"exclude_classes: {unknown} are not classes of {cfg.data.shards}")
    transform = input_transform(augment_config(members[0]), cfg.tta)
    stream = data.EvalStream(split, transform, cfg.batch_size, rank, world, cfg.workers,
                             members[0].config["data"]["max_bad_fraction"])
    excluded = torch.tensor([split.classes.index(c) for c in cfg.exclude_classes], dtype=torch.int64)
    num_classes = len(split.classes)
    metrics = {m.name: ProbabilityMetrics(num_classes, device) for m in members}
    ensemble = ProbabilityMetrics(num_classes, device)
    # before temperature scaling, when a calibration is applied (NLL and ECE, before and after)
    raw = ({name: ProbabilityMetrics(num_classes, device) for name in [*metrics, ENSEMBLE]}
           if scorer.calibrated else {})  # uncalibrated, they would repeat `metrics` and `ensemble`
    decisions = acceptance.Decisions([m.name for m in members])
    confusion = Confusion(num_classes)
    bad = 0
    seen = progress.of_ranks("evaluate", split.num_samples, cfg.progress_every_s, rank == 0, world)
    for batch in seen.track(data.eval_batches(stream, cfg.workers), lambda b: len(b.labels) + len(b.bad)):
        bad += len(batch.bad)
        keep = ~torch.isin(batch.labels, excluded)
        if not bool(keep.any()):
            continue
        labels, images = batch.labels[keep].to(device), batch.images[keep]
        scores = scorer(images)
        for m, p in zip(members, scores.members):
            metrics[m.name].update(p, labels)
        ensemble.update(scores.ensemble, labels)
        confusion.update(scores.ensemble, labels)
        for name, p in zip(raw, [*scores.raw_members, scores.raw_ensemble]):
            raw[name].update(p, labels)
        decisions.update(scores, labels)
        if samples is not None:
            samples.update(scores.ensemble, labels, images,
                           tuple(k for k, m in zip(batch.keys, keep.tolist()) if m))
    if samples is not None:
        samples.merge_ranks()
    member_values = {name: state.all_reduce().compute() for name, state in metrics.items()}
    report = {"split": cfg.data.split, "combine": cfg.combine, "tta": cfg.tta, "checkpoint": cfg.checkpoint,
              "excluded_classes": list(cfg.exclude_classes), "classes": list(split.classes),
              "members": member_values, "ensemble": ensemble.all_reduce().compute(),
              "bad_samples": _sum_over_ranks(bad, device)}
    report["calibration"] = calibration_section(cfg, scorer, report, raw)
    report["acceptance"] = acceptance.report(decisions, scorer, list(split.classes), list(cfg.precisions))
    confusion.all_reduce()
    report["reliability"] = {"ensemble": ensemble.calibration.diagram(),
                             **{name: state.calibration.diagram() for name, state in metrics.items()}}
    report["per_class"] = per_class(report, confusion)
    counts, source = frequency.training_counts(cfg.data.shards, members[0].config["data"]["train_split"])
    report["frequency"] = frequency.section(report, counts, source, cfg.frequency_bins)
    report["most_confused"] = [{"true": split.classes[t], "predicted": split.classes[p], "count": n,
                                "of_true": n / report["per_class"][t]["support"]}
                               for t, p, n in confusion.most_confused(cfg.confused_pairs)]
    shown = confusion.shown_classes(cfg.plot_classes)
    report["confusion"] = {"classes": [split.classes[c] for c in shown],
                           "counts": confusion.matrix(shown).tolist()}
    return report


def calibration_section(cfg: EvaluateConfig, scorer: Scorer, report: dict, raw: dict) -> dict:
    """Temperatures applied, and NLL/ECE of each model before and after them."""
    if not scorer.calibrated:
        return {"applied": False, "file": None}
    before = {name: state.all_reduce().compute() for name, state in raw.items()}
    after = {**report["members"], ENSEMBLE: report["ensemble"]}
    temps = {**{m.name: t for m, t in zip(scorer.members, scorer.temperatures)},
             ENSEMBLE: scorer.ensemble_temperature}
    return {"applied": True, "file": str(calibration_path(cfg.bag)), "temperatures": temps,
            "models": {name: {"nll_before": before[name]["nll"], "nll_after": after[name]["nll"],
                              "ece_before": before[name]["ece"], "ece_after": after[name]["ece"]}
                       for name in after}}


def _sum_over_ranks(value: int, device: torch.device) -> int:
    return int(distributed.all_sum(torch.tensor([value], dtype=torch.float64, device=device)).item())


def per_class(report: dict, confusion: Confusion) -> list[dict]:
    """One row per class: the ensemble's support/precision/recall/F1/top-5 recall, each member's recall."""
    top5 = report["ensemble"]["per_class_top5"]
    rows = []
    for row in confusion.rows():
        name = report["classes"][row.index]
        values = {"class": name, "support": row.support, "predicted": row.predicted, "correct": row.correct,
                  "precision": row.precision, "recall": row.recall, "f1": row.f1,
                  "top5_recall": top5[row.index], "excluded": name in report["excluded_classes"]}
        values.update({f"recall.{m}": v["per_class_recall"][row.index] for m, v in report["members"].items()})
        rows.append(values)
    return rows


def markdown(report: dict, files: dict[str, Path] | None = None) -> str:
    rows = [*report["members"].items(), ("**ensemble**", report["ensemble"])]
    title = f"# Evaluation on `{report['split']}` ({report['combine']} of probabilities, TTA {report['tta']})"
    accepted = report["acceptance"]["thresholds"]
    extra = ["auto coverage", "auto precision"] if accepted else []
    header = "| model | " + " | ".join([*SUMMARY_KEYS, *extra]) + " |"
    lines = [title, "", header, "|---" * (len(SUMMARY_KEYS) + len(extra) + 1) + "|"]
    for name, values in rows:
        cells = [f"{values[k]:.4f}" if isinstance(values[k], float) else str(values[k]) for k in SUMMARY_KEYS]
        auto = accepted.get(name.strip("*"))
        if extra:
            cells += [f"{auto['coverage']:.3f}", acceptance._fmt(auto["precision"])] if auto else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if accepted:
        target = next(iter(accepted.values()))["target_precision"]
        lines += ["", f"auto: objects above their class's threshold (fitted on validation for precision "
                  f"{target}), and the precision they reach on this split."]
    lines += calibration_markdown(report["calibration"])
    lines += acceptance.markdown(report["acceptance"])
    lines += frequency.markdown(report["frequency"])
    if report["most_confused"]:
        lines += ["", "## Most confused pairs (ensemble)", "", "| true | predicted | count | of true class |",
                  "|---|---|---:|---:|"]
        lines += [f"| {c['true']} | {c['predicted']} | {c['count']} | {c['of_true']:.1%} |"
                  for c in report["most_confused"][:10]]
    if report["excluded_classes"]:
        lines += ["", f"Excluded from the summary: {', '.join(report['excluded_classes'])}."]
    if report["bad_samples"]:
        lines += ["", f"{report['bad_samples']} undecodable sample(s) were skipped."]
    if files:
        lines += ["", "Files: " + ", ".join(f"`{p.name}`" for p in files.values())]
    return "\n".join(lines) + "\n"


def calibration_markdown(section: dict) -> list[str]:
    if not section["applied"]:
        return ["", "Uncalibrated (calibration=none, or the bag has no calibration.json)."]
    lines = ["", f"## Temperature scaling (`{section['file']}`)", "",
             "| model | temperature | nll before | nll after | ece before | ece after |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in section["models"].items():
        lines.append(f"| {name} | {section['temperatures'][name]:.3f} | {m['nll_before']:.4f} | "
                     f"{m['nll_after']:.4f} | {m['ece_before']:.4f} | {m['ece_after']:.4f} |")
    return lines


def write_report(report: dict, out: Path, plots: bool) -> dict[str, Path]:
    """Every report file into `out`; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    files = {kind: out / name for kind, name in FILES.items() if plots or not name.endswith(".png")}
    if "skipped" in report["frequency"]:  # no training counts to plot recall against
        files.pop("recall", None)
    text = json.dumps(jsonable(report), indent=1, allow_nan=False)  # NaN (a class without samples) -> "nan"
    atomic_write(files["json"], text + "\n")
    atomic_write(files["md"], markdown(report, files))
    atomic_write(files["csv"], csv_text(report["per_class"]))
    if plots:
        n_classes = len(report["classes"])
        shown = report["confusion"]["classes"]
        support = [report["per_class"][report["classes"].index(c)]["support"] for c in shown]
        title = (f"Ensemble confusion on {report['split']}" if len(shown) == n_classes else
                 f"Ensemble confusion: the {len(shown)} of {n_classes} classes with the most errors")
        plots_mod.confusion_png(files["confusion"], np.asarray(report["confusion"]["counts"]), shown, support,
                                title)
        eces = {"ensemble": report["ensemble"]["ece"], **{m: v["ece"] for m, v in report["members"].items()}}
        plots_mod.reliability_png(files["reliability"], report["reliability"], eces, "ensemble")
        section = report["acceptance"]
        curves = {m: (np.asarray(c["coverage"]), np.asarray(c["precision"]))
                  for m, c in section["curves"].items()}
        points = {m: (t["coverage"], t["precision"]) for m, t in section["thresholds"].items()}
        plots_mod.precision_coverage_png(files["coverage"], curves, points, section["precisions"], ENSEMBLE)
        if "recall" in files:
            by_count = report["frequency"]
            plots_mod.recall_vs_count_png(files["recall"], by_count["train_counts"],
                                          frequency.recalls(report), by_count["edges"], ENSEMBLE)
    return files


def csv_text(rows: list[dict]) -> str:
    """Rows of dicts as CSV, floats to 6 significant digits (per_class.csv; the heads' tables too)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def run(cfg: EvaluateConfig) -> int:
    env = distributed.detect()
    device = distributed.init(env, cfg.dist_timeout_s)
    out = Path(cfg.out or cfg.bag)
    try:
        # taken before the work, so a second writer is refused at once; the output folder only: a bag's
        # members keep their own locks, which a training of one of them holds
        with lock.writing(out, "evaluate", env):
            logfile.attach(out, "evaluate", distributed.is_main(env))  # evaluate.log beside the report
            samples = None  # nothing collected for W&B when it is off
            if cfg.logger.mode != "disabled":
                from trainer.inference import wandb_report

                samples = wandb_report.SampleCollector()
            report = evaluate(cfg, env.rank, env.world_size, device, samples)
            if distributed.is_main(env):
                files = write_report(report, out, cfg.plots)
                if samples is not None:
                    wandb_report.log_report(cfg, report, files, out, samples)
                logfile.echo(markdown(report) + "\nwritten: " + ", ".join(str(p) for p in files.values()))
        return 0
    finally:
        distributed.cleanup()
