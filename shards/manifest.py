"""The final step: `_info.json`, `classes.txt`, `quarantine.tsv`, `corrections.tsv`, `counts.tsv`.

`_info.json` uses the layout timm's WebDataset reader reads (`splits.<name>.filenames`,
`shard_lengths`, `num_samples`) and adds the class map, counts and per-shard size and sha256 (of the
tar and of its `.idx`).
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shards.info import INFO
from shards.plan import ShardPlan
from shards.sources import SPLITS, Collection, Reject
from shards.writer import PARTS, ShardResult, atomic_write, index_name
from trainer.runtime.exits import RunFailure

FORMAT = "taxotrain-shards/1"


class IncompleteBuild(RunFailure):
    """Some planned shards have no result yet (an array task has not run or failed)."""


@dataclass
class Tally:
    inputs: Counter
    written: Counter
    quarantined: Counter

    @property
    def total_inputs(self) -> int:
        return sum(self.inputs.values())

    @property
    def total_quarantined(self) -> int:
        return sum(self.quarantined.values())


def load_results(plans: list[ShardPlan], out: Path) -> list[ShardResult]:
    results, missing = [], []
    for plan in plans:
        side = out / PARTS / f"{plan.name}.json"
        result = ShardResult.load(side) if side.exists() else None
        if result is None or result.plan != plan.digest:
            missing.append(plan.name)
        else:
            results.append(result)
    if missing:
        raise IncompleteBuild(f"{len(missing)} shard(s) not written yet or written from another "
                              f"plan, e.g. {missing[:5]}: run the remaining tasks (stage=write)")
    return results


def tally(col: Collection, plans: list[ShardPlan], results: list[ShardResult]) -> Tally:
    inputs, written, quarantined = Counter(), Counter(), Counter()
    for plan in plans:
        for it in plan.items:
            inputs[(plan.split, col.classes[it.label])] += 1
    for r in col.rejects:
        inputs[(r.split, r.cls)] += 1
        quarantined[(r.split, r.cls)] += 1
    for res in results:
        for cls, n in res.class_counts.items():
            written[(res.split, cls)] += n
        for _, split, cls, _ in res.rejects:
            quarantined[(split, cls)] += 1
    for k in inputs:
        # inputs = written + quarantined, per split and class, or the build is wrong
        if inputs[k] != written[k] + quarantined[k]:
            raise AssertionError(f"counts do not reconcile for {k}: {inputs[k]} inputs, "
                                 f"{written[k]} written, {quarantined[k]} quarantined")
    return Tally(inputs, written, quarantined)


def all_rejects(col: Collection, results: list[ShardResult]) -> list[Reject]:
    rows = list(col.rejects)
    rows += [Reject(*r) for res in results for r in res.rejects]
    return rows


def _tsv(rows: list[list], header: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def write_manifest(col: Collection, results: list[ShardResult], t: Tally, out: Path,
                   build: dict) -> dict:
    splits = {}
    for split in SPLITS:
        mine = [r for r in results if r.split == split and r.num_samples > 0]
        splits[split] = {
            "name": split,
            "num_samples": sum(r.num_samples for r in mine),
            "filenames": [r.name for r in mine],
            "shard_lengths": [r.num_samples for r in mine],
            # the index's digest too: its lines say which bytes are whose label, so it is data
            "shards": [{"filename": r.name, "index": index_name(r.name), "num_samples": r.num_samples,
                        "bytes": r.bytes, "sha256": r.sha256, "index_sha256": r.index_sha256 or None}
                       for r in mine],
            "class_counts": [t.written[(split, c)] for c in col.classes],
        }
    info = {
        "format": FORMAT,
        "name": out.resolve().name,
        "classes": col.classes,
        "num_classes": len(col.classes),
        "empty_classes": col.empty_classes,
        "features": col.feature_names,
        "splits": splits,
        "inputs": t.total_inputs,
        "quarantined": t.total_quarantined,
        "build": build,
    }
    atomic_write(out / "classes.txt", "".join(f"{c}\n" for c in col.classes).encode())
    atomic_write(out / "quarantine.tsv", _tsv(
        [[r.origin, r.split, r.cls, r.reason] for r in all_rejects(col, results)],
        ["path", "split", "class", "reason"]))
    atomic_write(out / "corrections.tsv", _tsv(
        [n for res in results for n in res.notes], ["path", "stored_as"]))
    atomic_write(out / "counts.tsv", _tsv(
        [[s or "-", c or "-", n, t.written[(s, c)], t.quarantined[(s, c)]]
         for (s, c), n in sorted(t.inputs.items())],
        ["split", "class", "inputs", "written", "quarantined"]))
    # written last: its presence means the shard set is complete
    atomic_write(out / INFO, json.dumps(info, indent=1).encode())
    return info


def summary(t: Tally) -> str:
    lines = [f"{'split':<6} {'class':<24} {'inputs':>8} {'written':>8} {'quarantined':>11}"]
    for split in (*SPLITS, ""):
        keys = [k for k in t.inputs if k[0] == split]
        if not keys:
            continue
        bad = [k for k in sorted(keys) if t.quarantined[k]]
        for k in bad[:20]:  # per-class detail only where something was lost
            lines.append(f"{split or '-':<6} {k[1][:24] or '-':<24} {t.inputs[k]:>8} "
                         f"{t.written[k]:>8} {t.quarantined[k]:>11}")
        if len(bad) > 20:
            lines.append(f"{split or '-':<6} ... {len(bad) - 20} more classes in counts.tsv")
        n = sum(t.inputs[k] for k in keys)
        w = sum(t.written[k] for k in keys)
        lines.append(f"{split or '-':<6} {'(all classes)':<24} {n:>8} {w:>8} {n - w:>11}")
    return "\n".join(lines)
