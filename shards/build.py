"""`python -m shards.build source=<imagefolder|csv|ecotaxa|images|demo> out=DIR [...]` (`taxotrain-shards`).

Thin entry point: the schema judges the config (`shards/config.py`), then `build()` plans, writes and
reports. Exit codes: 0 done; 1 too many inputs quarantined or an incomplete array build; 2 a bad command
(also a fault of the table itself: an unknown annotation status, a duplicate id, a class map cycle).
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from shards import config
from shards.config import ShardConfig
from shards.items import SPLITS
from shards.manifest import Tally, load_results, status_counts, status_summary, summary, tally, write_manifest
from shards.plan import ShardPlan, make_plan
from shards.sources import collect
from shards.writer import PARTS, ShardResult, WriteOptions, index_name, write_shard
from trainer.runtime import cli, logfile
from trainer.runtime.exits import RunFailure
from trainer.runtime.files import TEMP_INFIX
from trainer.runtime.lock import FolderLock
from trainer.runtime.progress import Progress

log = logging.getLogger("shards.build")


class TooManyBad(RunFailure):
    """More inputs were quarantined than `max_bad_fraction` allows."""


def _clean_stale_temps(out: Path, mine: list[ShardPlan] | None) -> None:
    """Remove the temporaries a killed build left: every one in `out` under the folder's lock (`mine`
    None), only those of its own shards in an array task, whose sibling tasks' are in flight."""
    if mine is None:
        stale = list(out.glob(f".*{TEMP_INFIX}*"))
    else:
        finals = [final for p in mine
                  for final in (out / p.name, out / index_name(p.name), out / PARTS / f"{p.name}.json")]
        stale = [t for f in finals for t in f.parent.glob(f".{f.name}{TEMP_INFIX}*")]
    for tmp in stale:
        tmp.unlink(missing_ok=True)


def _mine(plans: list[ShardPlan], cfg: ShardConfig) -> list[ShardPlan]:
    return [p for i, p in enumerate(plans) if i % cfg.task_count == cfg.task_index]


def _progress(mine: list[ShardPlan], cfg: ShardConfig) -> Progress:
    """Images of this task's shards, counted as each shard is done: a bar on a terminal, else a line
    every `progress_every_s`; `progress=false`, or `progress_every_s=0` unless `progress=true`: nothing."""
    what = "shards" if cfg.task_count == 1 else f"shards task {cfg.task_index}/{cfg.task_count}"
    shown = cfg.progress is True or (cfg.progress is None and cfg.progress_every_s > 0)
    return Progress(what, sum(len(p.items) for p in mine), every_s=cfg.progress_every_s, enabled=shown,
                    bar=cfg.progress, logger=log)


def _write(mine: list[ShardPlan], out: Path, opts: WriteOptions, cfg: ShardConfig) -> list[ShardResult]:
    results = []
    with _progress(mine, cfg) as seen:
        if cfg.workers == 1:
            for p in mine:
                results.append(write_shard(p, out, opts))
                seen.advance(len(p.items))
        else:
            with ProcessPoolExecutor(cfg.workers) as pool:
                for p, res in zip(mine, pool.map(write_shard, mine, [out] * len(mine), [opts] * len(mine))):
                    results.append(res)
                    seen.advance(len(p.items))
    return results


def build(cfg: ShardConfig) -> dict | None:
    """Build (or finish building) the shard set described by `cfg`; returns `_info.json`.

    One writer per out folder: stage=all and stage=finalize hold its lock (`trainer/runtime/lock.py`),
    so a second build is refused. stage=write does not lock: the tasks of one SLURM array write disjoint
    shards of the folder at the same time by design, and each cleans only its own shards' temporaries.
    """
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.stage == "write":
        return _build(cfg, out)
    with FolderLock(out, "shards"):
        return _build(cfg, out)


def _build(cfg: ShardConfig, out: Path) -> dict | None:
    col = collect(cfg.source)
    plans = make_plan(col, cfg)
    opts = WriteOptions(tuple(col.classes), tuple(col.feature_names), cfg.resize.max_side,
                        cfg.resize.quality, cfg.max_pixels)
    if cfg.stage in ("all", "write"):
        mine = _mine(plans, cfg)
        _clean_stale_temps(out, mine if cfg.stage == "write" else None)
        done = _write(mine, out, opts, cfg)
        skipped = sum(r.skipped for r in done)
        log.info("task %d/%d: %d shard(s) written, %d already up to date",
                 cfg.task_index, cfg.task_count, len(done) - skipped, skipped)
    if cfg.stage == "write":
        return None
    results = load_results(plans, out)
    t = tally(col, plans, results)
    statuses = status_counts(col, plans, results)
    build_info = {"source": cfg.source.kind, "seed": cfg.seed, "split": asdict(cfg.split),
                  "resize": asdict(cfg.resize), "max_pixels": cfg.max_pixels, "class_map": col.class_map}
    info = write_manifest(col, results, t, statuses, out, build_info)
    logfile.echo("\n".join(filter(None, [summary(t), status_summary(statuses)])))
    for name in col.empty_classes:
        logfile.echo(f"warning: class {name!r} has no images")
    for line in _unmeasured(info):
        logfile.echo(line)
    _report(t, sum(len(s["filenames"]) for s in info["splits"].values()), out, cfg.max_bad_fraction)
    return info


def _unmeasured(info: dict) -> list[str]:
    """A warning per class with images but none in val or test (a split that has samples at all):
    its accuracy is never measured there, which rare classes hit first with a fractional split."""
    splits = info["splits"]
    held_out = [s for s in ("val", "test") if splits.get(s, {}).get("num_samples")]
    lines = []
    for i, name in enumerate(info["classes"]):
        counts = {s: splits[s]["class_counts"][i] for s in SPLITS if "class_counts" in splits.get(s, {})}
        total = sum(counts.values())
        if total and any(counts[s] == 0 for s in held_out):
            shown = ", ".join(f"{counts[s]} in {s}" for s in held_out)
            lines.append(f"warning: class {name!r} has {total} image(s), {shown}")
    return lines


def _report(t: Tally, shards: int, out: Path, max_bad_fraction: float) -> None:
    """The one-line reconciliation; too many quarantined inputs fail the build (excluded rows were never
    meant to be written, so they are neither bad nor part of the fraction's base)."""
    n, q, x = t.total_inputs, t.total_quarantined, t.total_excluded
    meant = n - x
    excluded = f" + {x} excluded" if x else ""
    logfile.echo(f"shards: {n} inputs = {meant - q} written + {q} quarantined{excluded} "
                 f"({100.0 * q / max(meant, 1):.2f}%) in {shards} shards -> {out}")
    if meant and q / meant > max_bad_fraction:
        raise TooManyBad(f"{q} of {meant} inputs to write quarantined ({q / meant:.1%}) > max_bad_fraction="
                         f"{max_bad_fraction}: see {out / 'quarantine.tsv'}")


def run(cfg: ShardConfig) -> int:
    build(cfg)
    return 0


config.register()
main = cli.tool("shard", ShardConfig, run, __doc__)

if __name__ == "__main__":
    main()
