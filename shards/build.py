"""`python -m shards.build source=<imagefolder|csv|ecotaxa|images|demo> out=DIR [...]` (`taxotrain-shards`).

Thin entry point: the schema judges the config (`shards/config.py`), then `build()` plans, writes and
reports. Exit codes: 0 done; 1 too many inputs quarantined or an incomplete array build; 2 a bad command
(also a fault of the table itself: an unknown annotation status, a duplicate id, a class map cycle).
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from shards import claim, config, listing
from shards.config import ShardConfig
from shards.info import INFO
from shards.items import SPLITS, Collection
from shards.keys import WHOLE, Part
from shards.listing import Listing, listing_of
from shards.manifest import (
    IncompleteBuild,
    Tally,
    load_results,
    status_counts,
    status_summary,
    summary,
    tally,
    write_manifest,
)
from shards.plan import ShardPlan, make_plan
from shards.sources import collect
from shards.writer import PARTS, ShardResult, WriteOptions, index_name, write_shard
from trainer.runtime import cli, logfile
from trainer.runtime.exits import ConfigError, RunFailure
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
    if cfg.partition:
        return plans  # the task listed its own share: every shard of its plan is its own
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
    shards of the folder at the same time by design, and each cleans only its own shards' temporaries;
    every stage claims the folder for its build (`shards/claim.py`), so another build's tasks are refused.
    """
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.stage == "write":
        return _build(cfg, out, claim.claim(out, cfg))
    with FolderLock(out, "shards"):
        return _build(cfg, out, claim.claim(out, cfg))


def _build(cfg: ShardConfig, out: Path, build: str) -> dict | None:
    if cfg.stage in ("all", "write"):
        col, plans = plan(cfg, out)
        _write_mine(col, plans, out, cfg)
        if cfg.partition:
            # after the task's last shard: the record's presence says the task is done
            listing.save(listing_of(col, plans), _record(out, cfg), build)
    if cfg.stage == "write":
        return None
    if cfg.partition:  # the task records, never the collection: memory of the shards, not the inputs
        found, generations = _merged(cfg, out, build)
    else:
        if cfg.stage == "finalize":
            col, plans = plan(cfg, out)
        found, generations = listing_of(col, plans), None
    info = _finalize(found, generations, out, cfg)
    claim.release(out, build)
    return info


def _write_mine(col: Collection, plans: list[ShardPlan], out: Path, cfg: ShardConfig) -> None:
    mine = _mine(plans, cfg)
    # a partitioned task's siblings may be writing beside it even when it runs stage=all
    _clean_stale_temps(out, mine if cfg.stage == "write" or cfg.partition else None)
    opts = WriteOptions(tuple(col.classes), tuple(col.feature_names), cfg.resize.max_side,
                        cfg.resize.quality, cfg.max_pixels)
    done = _write(mine, out, opts, cfg)
    skipped = sum(r.skipped for r in done)
    log.info("task %d/%d: %d shard(s) written, %d already up to date",
             cfg.task_index, cfg.task_count, len(done) - skipped, skipped)


def _finalize(found: Listing, generations: list[dict] | None, out: Path, cfg: ShardConfig) -> dict:
    """The manifest and reports from the listing and the shards' sidecars; the reconciliation line."""
    results = load_results(found.shards, out)
    t = tally(found, results)
    statuses = status_counts(found, results)
    build_info = {"source": cfg.source.kind, "seed": cfg.seed, "split": asdict(cfg.split),
                  "resize": asdict(cfg.resize), "max_pixels": cfg.max_pixels, "class_map": found.class_map}
    if generations is not None:
        build_info["generations"] = generations
    info = write_manifest(found, results, t, statuses, out, build_info)
    logfile.echo("\n".join(filter(None, [summary(t), status_summary(statuses)])))
    for name in found.empty_classes:
        logfile.echo(f"warning: class {name!r} has no images")
    for line in _unmeasured(info):
        logfile.echo(line)
    _report(t, sum(len(s["filenames"]) for s in info["splits"].values()), out, cfg.max_bad_fraction)
    return info


def plan(cfg: ShardConfig, out: Path) -> tuple[Collection, list[ShardPlan]]:
    """The collection (a partitioned task's share of it) and its shards; an increment numbers its
    classes after the set's own."""
    part = Part(cfg.task_index, cfg.task_count) if cfg.partition else WHOLE
    col = collect(cfg.source, part)
    if cfg.increment:
        col = _after(_previous(out, cfg)["classes"], col)
    prefix = f"{cfg.increment}-" if cfg.increment else ""
    return col, make_plan(col, cfg, f"{prefix}p{cfg.task_index:04d}-" if cfg.partition else "")


def _after(old: list[str], col: Collection) -> Collection:
    """`col` with the set's classes first, in their order, and its new ones after them: the class
    numbers already written into the set's shards stay what they are."""
    classes = old + [c for c in col.classes if c not in old]
    moved = [classes.index(c) for c in col.classes]
    items = [it if not it.labelled else replace(it, label=moved[it.label]) for it in col.items]
    return replace(col, classes=classes, items=items,
                   empty_classes=[c for c in classes if c in col.empty_classes or c not in col.classes])


def _previous(out: Path, cfg: ShardConfig) -> dict:
    """The finished set an increment adds to: its `_info.json`, which must come from a partitioned build."""
    try:
        info = json.loads((out / INFO).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"increment={cfg.increment}: {out / INFO} cannot be read ({err}): an increment "
                          f"adds to a finished shard set; build the set first (partition=true)") from None
    if "generations" not in info.get("build", {}):
        raise ConfigError(f"increment={cfg.increment}: {out} was not built with partition=true, so it has "
                          f"no task records to merge with; rebuild it partitioned, or build the new objects "
                          f"apart")
    return info


def _record(out: Path, cfg: ShardConfig) -> Path:
    return listing.task_record(out, cfg.increment or "", cfg.task_index, cfg.task_count)


def _merged(cfg: ShardConfig, out: Path, build: str) -> tuple[Listing, list[dict]]:
    """Every task record of this build and of the set's earlier generations, merged; the generations
    for `_info.json`. A missing record is an `IncompleteBuild` naming the tasks to run."""
    earlier = []
    if cfg.increment:  # a rerun of the same increment replaces its own generation
        earlier = [g for g in _previous(out, cfg)["build"]["generations"] if g["name"] != cfg.increment]
    generations = [*earlier, {"name": cfg.increment or "", "build": build, "tasks": cfg.task_count}]
    found, missing = [], []
    for g in generations:
        for i in range(g["tasks"]):
            one = listing.load(listing.task_record(out, g["name"], i, g["tasks"]), g["build"])
            if one is None:
                missing.append(f"{g['name'] or 'base'} task {i}")
            else:
                found.append(one)
    if missing:
        raise IncompleteBuild(f"{len(missing)} task record(s) of {out} missing or from other settings: "
                              f"{', '.join(missing[:10])}; run those tasks (stage=write) with the same "
                              f"settings")
    return listing.merge(found), generations


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
