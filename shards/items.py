"""What a source yields: `Item`s to write, `Reject`s to quarantine, rows it excluded, as one `Collection`."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")
# the annotation status of every input of a source without a status column (folders, plain tables)
NO_STATUS = "-"
# the label of an item of the unlabelled set: its samples carry no `.cls` member
UNLABELLED = -1


@dataclass(frozen=True)
class Item:
    key: str
    path: str          # absolute path read by the writer
    rel: str           # path as the collection names it; stored in the sample
    label: int         # index into Collection.classes, or UNLABELLED
    split: str | None
    features: tuple[float, ...] = ()
    status: str = NO_STATUS
    source_id: str = ""  # the table's own id (source.key_column), stored as "id" in the sample's .json
    fine: str = ""       # the class the source named, when source.class_map regrouped it

    @property
    def labelled(self) -> bool:
        return self.label != UNLABELLED


@dataclass(frozen=True)
class Reject:
    origin: str        # the path as the collection names it, or "table:line" without one
    split: str         # "" when not known
    cls: str           # "" when not known or unlabelled
    reason: str
    status: str = NO_STATUS


@dataclass
class Collection:
    classes: list[str]
    items: list[Item]
    rejects: list[Reject] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    # rows neither labelled nor written (source.unlabelled null): (status, class as named) -> rows
    excluded: Counter = field(default_factory=Counter)
    class_map: dict[str, str] = field(default_factory=dict)  # fine -> coarse, chains resolved
    unlabelled: str | None = None  # the split name of the unlabelled set, when one is written


def class_of(classes: list[str] | tuple[str, ...], label: int) -> str:
    """The class name of `label`; "" for an item of the unlabelled set."""
    return "" if label == UNLABELLED else classes[label]


def dedupe(items: list[Item], rejects: list[Reject], classes: list[str]) -> list[Item]:
    """The first item of each key; each later one quarantined (appended to `rejects`)."""
    seen: dict[str, Item] = {}
    kept = []
    for it in items:
        if it.key in seen:
            rejects.append(Reject(it.rel, it.split or "", class_of(classes, it.label),
                                  f"duplicate key {it.key!r} (first: {seen[it.key].rel})", it.status))
            continue
        seen[it.key] = it
        kept.append(it)
    return kept
