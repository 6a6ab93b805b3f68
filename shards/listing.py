"""What the manifest needs from a listing and its plan, as one record: `Listing`.

A build that is not partitioned makes one from the whole collection just before its manifest. A
partitioned build (`partition=true`) has each array task save its own (`_parts/_tasks/`) after its
shards, so that the final step merges these records and the shards' sidecars, never the collection:
its memory grows with the number of shards and quarantined inputs, not with the inputs.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.items import Collection, Reject, class_of
from shards.plan import ShardPlan
from shards.writer import PARTS
from trainer.runtime.exits import UsageError
from trainer.runtime.files import atomic_write

TASKS = f"{PARTS}/_tasks"


class MixedListings(UsageError):
    """Task records that cannot be one shard set: other class lists, features or unlabelled set."""


@dataclass
class Listing:
    classes: list[str]
    features: list[str]
    unlabelled: str | None
    class_map: dict[str, str]
    empty_classes: list[str]
    shards: list[tuple[str, str]]  # (shard name, plan digest), in plan order
    # (split, class) -> planned inputs; (split, class) -> fine class -> planned inputs regrouped
    inputs: Counter = field(default_factory=Counter)
    regrouped: dict = field(default_factory=lambda: defaultdict(Counter))
    # status -> planned inputs, labelled and unlabelled items planned
    statuses: dict = field(default_factory=lambda: defaultdict(Counter))
    rejects: list[Reject] = field(default_factory=list)   # inputs the listing itself quarantined
    excluded: Counter = field(default_factory=Counter)    # (status, class as named) -> rows not written


def listing_of(col: Collection, plans: list[ShardPlan]) -> Listing:
    out = Listing(list(col.classes), list(col.feature_names), col.unlabelled, dict(col.class_map),
                  list(col.empty_classes), [(p.name, p.digest) for p in plans],
                  rejects=list(col.rejects), excluded=Counter(col.excluded))
    for plan in plans:
        for it in plan.items:
            key = (plan.split, class_of(col.classes, it.label))
            out.inputs[key] += 1
            if it.fine:
                out.regrouped[key][it.fine] += 1
            out.statuses[it.status]["inputs"] += 1
            out.statuses[it.status]["labelled" if it.labelled else "unlabelled"] += 1
    return out


def merge(listings: list[Listing]) -> Listing:
    """One listing of several tasks (and increments); the class list of the latest, which every
    earlier one must begin: class numbers already written into shards never move."""
    last = listings[-1]
    for other in listings:
        _check_same(other, last)
    out = Listing(last.classes, last.features, last.unlabelled, {}, [], [])
    for one in listings:
        out.class_map.update(one.class_map)
        out.shards += one.shards
        out.inputs.update(one.inputs)
        for key, fine in one.regrouped.items():
            out.regrouped[key].update(fine)
        for status, n in one.statuses.items():
            out.statuses[status].update(n)
        out.rejects += one.rejects
        out.excluded.update(one.excluded)
    # empty in the merged set: empty (or not yet a class) in every task that listed it
    out.empty_classes = [c for c in last.classes
                         if all(c in one.empty_classes or c not in one.classes for one in listings)]
    return out


def _check_same(one: Listing, last: Listing) -> None:
    if last.classes[:len(one.classes)] != one.classes:
        raise MixedListings(f"task records with class lists that are not one another's beginning: "
                            f"{one.classes[:5]}... and {last.classes[:5]}...")
    if (one.features, one.unlabelled) != (last.features, last.unlabelled):
        raise MixedListings(f"task records with other features or unlabelled set: {one.features}, "
                            f"{one.unlabelled!r} against {last.features}, {last.unlabelled!r}")


# ---------------------------------------------------------------- task records on disk


def task_record(out: Path, generation: str, index: int, count: int) -> Path:
    return out / TASKS / f"{generation or 'base'}-{index:05d}-of-{count:05d}.json"


def save(listing: Listing, path: Path, build: str) -> None:
    """Written after the task's last shard: its presence says the task is done."""
    data = {"build": build, "classes": listing.classes, "features": listing.features,
            "unlabelled": listing.unlabelled, "class_map": listing.class_map,
            "empty_classes": listing.empty_classes, "shards": listing.shards,
            "inputs": _rows(listing.inputs), "excluded": _rows(listing.excluded),
            "regrouped": [[*k, fine, n] for k, c in listing.regrouped.items() for fine, n in c.items()],
            "statuses": {s: dict(n) for s, n in listing.statuses.items()},
            "rejects": [list(asdict(r).values()) for r in listing.rejects]}
    atomic_write(path, json.dumps(data).encode())


def load(path: Path, build: str) -> Listing | None:
    """The record at `path` when it is `build`'s; None when missing or another build's."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.pop("build", None) != build:
        return None
    regrouped: dict = defaultdict(Counter)
    for split, cls, fine, n in data.pop("regrouped"):
        regrouped[(split, cls)][fine] += n
    return Listing(
        **{**data, "shards": [tuple(s) for s in data["shards"]], "inputs": _counter(data["inputs"]),
           "excluded": _counter(data["excluded"]), "rejects": [Reject(*r) for r in data["rejects"]],
           "regrouped": regrouped,
           "statuses": defaultdict(Counter, {s: Counter(n) for s, n in data["statuses"].items()})})


def _rows(counts: Counter) -> list[list]:
    return [[*key, n] for key, n in counts.items()]


def _counter(rows: list[list]) -> Counter:
    return Counter({tuple(row[:-1]): row[-1] for row in rows})
