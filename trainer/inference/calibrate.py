"""Fit a bag's calibration on its validation split, stored as `<bag>/calibration.json`.

Temperature scaling (Guo et al. 2017): one temperature per member, fitted by NLL on the logits of its
test-time views, then one for the ensemble, fitted on the combination of the calibrated members. A
bag of bootstrap members is typically under-confident (averaging flattens the probabilities), which
its own temperature (< 1) corrects. Then, for the ensemble and for each member, per-class confidence
thresholds so that the objects accepted automatically reach `target_precision` on validation
(`calibration.fit_thresholds`). evaluate, predict, features and export read the file by default.

The fit uses at most `max_samples` validation objects (the first ones each rank streams; shards are
shuffled at build time): the logits of every view are held in memory until the fit, on rank 0.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from trainer.data import shardset
from trainer.data import streams as data
from trainer.inference import calibration as fitting
from trainer.inference.calibration import BagCalibration
from trainer.inference.config import CalibrateConfig
from trainer.inference.ensemble import combine
from trainer.inference.members import Member, augment_config, input_transform, load_bag, view_logits
from trainer.inference.scoring import ENSEMBLE, rescale
from trainer.runtime import distributed, lock, logfile, progress
from trainer.runtime.exits import ConfigError

log = logging.getLogger(__name__)


@torch.no_grad()
def collect(cfg: CalibrateConfig, members: list[Member], rank: int, world: int
            ) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Each member's view logits [V, N, C] and the labels [N] of up to max_samples validation
    objects, on rank 0 (None on the others)."""
    split = shardset.load(cfg.data.shards, cfg.data.split)
    shardset.check_across_ranks(split.shards, cfg.data.check, rank, world)
    if members[0].classes != list(split.classes):
        raise ConfigError(f"the bag was trained on other classes than {cfg.data.shards} has")
    transform = input_transform(augment_config(members[0]), cfg.tta)
    stream = data.EvalStream(split, transform, cfg.batch_size, rank, world, cfg.workers,
                             members[0].config["data"]["max_bad_fraction"])
    cap = math.ceil(cfg.max_samples / world)
    logits: list[list[torch.Tensor]] = [[] for _ in members]
    labels: list[torch.Tensor] = []
    taken = 0
    seen = progress.of_ranks("calibrate", min(cfg.max_samples, split.num_samples), cfg.progress_every_s,
                             rank == 0, world)
    for batch in seen.track(data.eval_batches(stream, cfg.workers), lambda b: len(b.labels)):
        if taken >= cap:
            break  # no collective runs inside this loop, so ranks may stop at different batches
        images = batch.images[: cap - taken]
        for store, m in zip(logits, members):
            store.append(view_logits(m, images, cfg.tta).float().cpu())
        labels.append(batch.labels[: len(images)])
        taken += len(images)
    mine = ([torch.cat(z, dim=1).numpy() if z else None for z in logits],
            torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64))
    parts = distributed.gather(mine)
    if parts is None:
        return None
    parts = [p for p in parts if len(p[1])]
    if not parts:
        raise ConfigError(f"data.split={cfg.data.split!r}: no readable sample to calibrate on")
    per_member = [np.concatenate([p[0][i] for p in parts], axis=1) for i in range(len(members))]
    return per_member, np.concatenate([p[1] for p in parts])


def fit(cfg: CalibrateConfig, names: list[str], logits: list[np.ndarray], labels: np.ndarray,
        classes: list[str]) -> BagCalibration:
    """Temperatures, thresholds and the before/after numbers of each member and the ensemble."""
    z64 = [z.astype(np.float64) for z in logits]
    temps = {n: fitting.fit_temperature(z, labels) for n, z in zip(names, z64)}
    raw = [fitting.softmax_t(z, 1.0) for z in z64]
    cal = [fitting.softmax_t(z, temps[n]) for n, z in zip(names, z64)]
    ens_raw = _combine(raw, cfg.combine)
    ens_pre = _combine(cal, cfg.combine)
    t_ens = fitting.fit_ensemble_temperature(ens_pre, labels)
    ens_cal = rescale(torch.from_numpy(ens_pre), t_ens).numpy()
    before = {**dict(zip(names, raw)), ENSEMBLE: ens_raw}
    after = {**dict(zip(names, cal)), ENSEMBLE: ens_cal}
    thresholds = {model: fitting.fit_thresholds(p.max(1), p.argmax(1), labels, len(classes),
                                                cfg.target_precision, cfg.min_samples)
                  for model, p in after.items()}
    metrics = {model: {"nll_before": fitting.nll(before[model], labels), "nll_after": fitting.nll(p, labels),
                       "ece_before": fitting.ece(before[model], labels), "ece_after": fitting.ece(p, labels)}
               for model, p in after.items()}
    return BagCalibration(split=cfg.data.split, shards=str(cfg.data.shards), n=len(labels), tta=str(cfg.tta),
                          combine=str(cfg.combine), members=temps, ensemble=t_ens, thresholds=thresholds,
                          metrics=metrics)


def _combine(probs: list[np.ndarray], mode: str) -> np.ndarray:
    return combine([torch.from_numpy(p) for p in probs], mode).numpy()


def table(result: BagCalibration, classes: list[str]) -> str:
    """The fit as a markdown table: temperature, NLL and ECE before/after, thresholds that fell back."""
    lines = [f"Calibration on `{result.split}` ({result.n} objects, TTA {result.tta}, {result.combine}):", "",
             "| model | temperature | nll before | nll after | ece before | ece after |",
             "|---|---:|---:|---:|---:|---:|"]
    temps = {**result.members, ENSEMBLE: result.ensemble}
    for model, m in result.metrics.items():
        lines.append(f"| {model} | {temps[model]:.3f} | {m['nll_before']:.4f} | {m['nll_after']:.4f} | "
                     f"{m['ece_before']:.4f} | {m['ece_after']:.4f} |")
    ens = result.thresholds[ENSEMBLE]
    fallback = [classes[i] for i, s in enumerate(ens.source) if s == "global"]
    never = [classes[i] for i, t in enumerate(ens.per_class) if not math.isfinite(t)]
    lines += ["", f"Ensemble thresholds for precision {ens.target_precision}: "
              f"global {ens.global_threshold:.4f}; "
              f"{len(fallback)} class(es) with fewer than {ens.min_samples} predictions use it"
              + (f" ({', '.join(fallback[:10])}{', ...' if len(fallback) > 10 else ''})" if fallback else "")
              + f"; {len(never)} class(es) never accepted automatically."]
    return "\n".join(lines)


def calibrate(cfg: CalibrateConfig, rank: int, world: int, device: torch.device) -> BagCalibration | None:
    """Fit and write the calibration (rank 0 returns it; the others None)."""
    members = load_bag(cfg.bag, cfg.members, cfg.checkpoint, device)
    collected = collect(cfg, members, rank, world)
    if collected is None:
        return None
    logits, labels = collected
    result = fit(cfg, [m.name for m in members], logits, labels, members[0].classes)
    result.save(cfg.out_path())
    logfile.echo(table(result, members[0].classes) + f"\nwritten: {cfg.out_path()}")
    return result


def run(cfg: CalibrateConfig) -> int:
    env = distributed.detect()
    device = distributed.init(env, cfg.dist_timeout_s)
    try:
        with lock.writing(cfg.out_path().parent, "calibrate", env):
            logfile.attach(cfg.out_path().parent, "calibrate", distributed.is_main(env))
            calibrate(cfg, env.rank, env.world_size, device)
        return 0
    finally:
        distributed.cleanup()
