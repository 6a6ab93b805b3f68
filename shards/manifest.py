"""The final step: `_info.json`, `classes.txt`, `quarantine.tsv`, `corrections.tsv`, `counts.tsv`,
`status_counts.tsv`.

`_info.json` uses the layout timm's WebDataset reader reads (`splits.<name>.filenames`,
`shard_lengths`, `num_samples`) and adds the class map, counts and per-shard size and sha256 (of the
tar and of its `.idx`). Each split says whether it is `labelled`; the unlabelled set (`source.unlabelled`)
has no `class_counts`. The counts reconcile twice: per (split, class), inputs = written + quarantined +
excluded (rows of the unlabelled set have class "", excluded rows split ""); per annotation status,
inputs = labelled + unlabelled + excluded + quarantined, with status "-" for every input of a source
without a status column.
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from shards.ecotaxa import STATUSES
from shards.info import INFO
from shards.items import SPLITS, Reject
from shards.listing import Listing
from shards.writer import PARTS, ShardResult, atomic_write, index_name
from trainer.runtime.exits import RunFailure

FORMAT = "taxotrain-shards/1"
STATUS_FIELDS = ("inputs", "labelled", "unlabelled", "excluded", "quarantined")


class IncompleteBuild(RunFailure):
    """Some planned shards have no result yet (an array task has not run or failed)."""


@dataclass
class Tally:
    inputs: Counter
    written: Counter
    quarantined: Counter
    excluded: Counter = field(default_factory=Counter)
    # (split, coarse class) -> fine class -> planned inputs that source.class_map regrouped
    regrouped: dict = field(default_factory=lambda: defaultdict(Counter))

    @property
    def total_inputs(self) -> int:
        return sum(self.inputs.values())

    @property
    def total_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def total_excluded(self) -> int:
        return sum(self.excluded.values())


def load_results(shards: list[tuple[str, str]], out: Path) -> list[ShardResult]:
    """The sidecar of every (name, plan digest); `IncompleteBuild` when any is missing or stale."""
    results, missing = [], []
    for name, digest in shards:
        side = out / PARTS / f"{name}.json"
        result = ShardResult.load(side) if side.exists() else None
        if result is None or result.plan != digest:
            missing.append(name)
        else:
            results.append(result)
    if missing:
        raise IncompleteBuild(f"{len(missing)} shard(s) not written yet or written from another "
                              f"plan, e.g. {missing[:5]}: run the remaining tasks (stage=write)")
    return results


def tally(listing: Listing, results: list[ShardResult]) -> Tally:
    t = Tally(Counter(listing.inputs), Counter(), Counter())
    for key, fine in listing.regrouped.items():
        t.regrouped[key].update(fine)
    for r in listing.rejects:
        t.inputs[(r.split, r.cls)] += 1
        t.quarantined[(r.split, r.cls)] += 1
    for (_, cls), n in listing.excluded.items():
        t.inputs[("", cls)] += n
        t.excluded[("", cls)] += n
    for res in results:
        for cls, n in res.class_counts.items():
            t.written[(res.split, cls)] += n
        for r in res.rejects:
            t.quarantined[(res.split, _reject(r).cls)] += 1
    for k in t.inputs:
        # inputs = written + quarantined + excluded, per split and class, or the build is wrong
        if t.inputs[k] != t.written[k] + t.quarantined[k] + t.excluded[k]:
            raise AssertionError(f"counts do not reconcile for {k}: {t.inputs[k]} inputs, {t.written[k]} "
                                 f"written, {t.quarantined[k]} quarantined, {t.excluded[k]} excluded")
    return t


def status_counts(listing: Listing, results: list[ShardResult]) -> dict[str, dict[str, int]]:
    """{status: {inputs, labelled, unlabelled, excluded, quarantined}}; labelled and unlabelled count
    samples written."""
    c: dict[str, Counter] = defaultdict(Counter)
    for status, n in listing.statuses.items():
        c[status].update(n)
    for res in results:
        for r in map(_reject, res.rejects):
            c[r.status]["unlabelled" if res.split == listing.unlabelled else "labelled"] -= 1
            c[r.status]["quarantined"] += 1
    for r in listing.rejects:
        c[r.status]["inputs"] += 1
        c[r.status]["quarantined"] += 1
    for (status, _), n in listing.excluded.items():
        c[status]["inputs"] += n
        c[status]["excluded"] += n
    written = sum(res.num_samples for res in results)
    if sum(n["labelled"] + n["unlabelled"] for n in c.values()) != written:
        raise AssertionError(f"status counts do not reconcile: {dict(c)} against {written} samples written")
    order = {s: i for i, s in enumerate(STATUSES)}
    return {s: {f: c[s][f] for f in STATUS_FIELDS} for s in sorted(c, key=lambda s: (order.get(s, 99), s))}


def _reject(row: list[str]) -> Reject:
    return Reject(*row)  # a sidecar from before statuses were recorded has 4 fields: status "-"


def all_rejects(listing: Listing, results: list[ShardResult]) -> list[Reject]:
    return list(listing.rejects) + [_reject(r) for res in results for r in res.rejects]


def _tsv(rows: list[list], header: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def _split_entry(listing: Listing, results: list[ShardResult], t: Tally, split: str) -> dict:
    mine = [r for r in results if r.split == split and r.num_samples > 0]
    labelled = split != listing.unlabelled
    entry = {
        "name": split,
        "labelled": labelled,
        "num_samples": sum(r.num_samples for r in mine),
        "filenames": [r.name for r in mine],
        "shard_lengths": [r.num_samples for r in mine],
        # the index's digest too: its lines say which bytes are whose label, so it is data
        "shards": [{"filename": r.name, "index": index_name(r.name), "num_samples": r.num_samples,
                    "bytes": r.bytes, "sha256": r.sha256, "index_sha256": r.index_sha256 or None}
                   for r in mine],
    }
    if labelled:
        entry["class_counts"] = [t.written[(split, c)] for c in listing.classes]
    return entry


def write_manifest(listing: Listing, results: list[ShardResult], t: Tally, statuses: dict, out: Path,
                   build: dict) -> dict:
    names = [*SPLITS, *([listing.unlabelled] if listing.unlabelled else [])]
    info = {
        "format": FORMAT,
        "name": out.resolve().name,
        "classes": listing.classes,
        "num_classes": len(listing.classes),
        "empty_classes": listing.empty_classes,
        "features": listing.features,
        "splits": {split: _split_entry(listing, results, t, split) for split in names},
        "inputs": t.total_inputs,
        "quarantined": t.total_quarantined,
        "excluded": t.total_excluded,
        "statuses": statuses,
        "build": build,
    }
    _write_reports(listing, results, t, statuses, out)
    # written last: its presence means the shard set is complete
    atomic_write(out / INFO, json.dumps(info, indent=1).encode())
    return info


def _write_reports(listing: Listing, results: list[ShardResult], t: Tally, statuses: dict, out: Path) -> None:
    atomic_write(out / "classes.txt", "".join(f"{c}\n" for c in listing.classes).encode())
    atomic_write(out / "quarantine.tsv", _tsv(
        [[r.origin, r.split, r.cls, r.reason, r.status] for r in all_rejects(listing, results)],
        ["path", "split", "class", "reason", "status"]))
    atomic_write(out / "corrections.tsv", _tsv(
        [n for res in results for n in res.notes], ["path", "stored_as"]))
    atomic_write(out / "counts.tsv", _tsv(
        [[s or "-", c or "-", n, t.written[(s, c)], t.quarantined[(s, c)], t.excluded[(s, c)],
          _regrouped(t.regrouped.get((s, c)))] for (s, c), n in sorted(t.inputs.items())],
        ["split", "class", "inputs", "written", "quarantined", "excluded", "regrouped_from"]))
    atomic_write(out / "status_counts.tsv", _tsv(
        [[s, *(n[f] for f in STATUS_FIELDS)] for s, n in statuses.items()], ["status", *STATUS_FIELDS]))


def _regrouped(fine: Counter | None) -> str:
    """`fine:count` pairs of the fine classes a coarse class row gathered ("" for none)."""
    return ";".join(f"{name}:{n}" for name, n in sorted((fine or {}).items()))


def summary(t: Tally) -> str:
    lines = [f"{'split':<10} {'class':<24} {'inputs':>8} {'written':>8} {'quarantined':>11} {'excluded':>8}"]
    for split in sorted({k[0] for k in t.inputs}, key=_split_order):
        keys = [k for k in t.inputs if k[0] == split]
        bad = [k for k in sorted(keys) if t.quarantined[k]]
        for k in bad[:20]:  # per-class detail only where something was lost
            lines.append(_line(split, k[1][:24], t.inputs[k], t.written[k], t.quarantined[k], t.excluded[k]))
        if len(bad) > 20:
            lines.append(f"{split or '-':<10} ... {len(bad) - 20} more classes in counts.tsv")
        sums = (sum(c[k] for k in keys) for c in (t.inputs, t.written, t.quarantined, t.excluded))
        lines.append(_line(split, "(all classes)", *sums))
    return "\n".join(lines)


def _split_order(split: str) -> tuple:
    """train, val, test, the unlabelled set, then "" (inputs never given a split)."""
    return (0, SPLITS.index(split)) if split in SPLITS else (2, "") if split == "" else (1, split)


def _line(split: str, cls: str, n: int, written: int, quarantined: int, excluded: int) -> str:
    return f"{split[:10] or '-':<10} {cls or '-':<24} {n:>8} {written:>8} {quarantined:>11} {excluded:>8}"


def status_summary(statuses: dict[str, dict[str, int]]) -> str:
    """One line per annotation status; "" for a source without a status column."""
    if set(statuses) <= {"-"}:
        return ""
    lines = [f"{'status':<13}" + "".join(f"{f:>12}" for f in STATUS_FIELDS)]
    lines += [f"{s:<13}" + "".join(f"{n[f]:>12}" for f in STATUS_FIELDS) for s, n in statuses.items()]
    return "\n".join(lines)
