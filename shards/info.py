"""The typed reader of `_info.json`, beside its writer (`shards/manifest.py`).

Every reader of a shard set (the trainer, `shards.verify`, the inference tools, the schemas that
check `data.shards` at start-up) goes through `read_info`, so a malformed manifest is reported in
one way, naming the file and the field. Two layouts are read: taxotrain's (per-shard bytes, sha256,
index file and, since index digests are recorded, its sha256; `labelled: false` on an unlabelled set)
and timm's (`filenames` and `shard_lengths` only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.runtime.exits import UsageError

INFO = "_info.json"


class InfoError(UsageError, ValueError):
    """The shard directory or its manifest cannot be used; the message names the file or split."""


@dataclass(frozen=True)
class ShardEntry:
    filename: str
    num_samples: int
    bytes: int | None = None        # None in timm's layout: size and sha256 cannot be checked
    sha256: str | None = None
    index: str | None = None        # the DALI index file beside the shard
    index_sha256: str | None = None  # its digest; None in manifests written before it was recorded


@dataclass(frozen=True)
class SplitInfo:
    name: str
    shards: tuple[ShardEntry, ...]
    # False for an unlabelled set (samples without .cls); True in older manifests and timm's layout
    labelled: bool = True
    # samples per class, in the order of `classes`; None in timm's layout and on an unlabelled set
    class_counts: tuple[int, ...] | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


@dataclass(frozen=True)
class ShardInfo:
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    features: tuple[str, ...]       # native feature names of the source table, in column order

    @property
    def path(self) -> Path:
        return self.root / INFO

    def split(self, name: str) -> SplitInfo:
        """A split with samples; an absent or empty one is an error naming those present."""
        if name not in self.splits:
            raise InfoError(f"{self.path}: no split {name!r}; present: {sorted(self.splits)}")
        found = self.splits[name]
        if found.num_samples == 0:
            raise InfoError(f"{self.path}: split {name!r} has no samples")
        return found


def read_info(root: Path) -> ShardInfo:
    path = Path(root) / INFO
    if not path.is_file():
        raise InfoError(f"{path}: no shard manifest here; build shards with `python -m shards.build` "
                        "or point data.shards at the folder holding _info.json")
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise InfoError(f"{path}: unreadable manifest: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("splits"), dict):
        raise InfoError(f"{path}: no 'splits' mapping (not a shards.build or timm manifest)")
    splits = {str(name): _split(path, str(name), entry) for name, entry in raw["splits"].items()}
    classes = raw.get("classes")
    # a set of unlabelled images only may have no classes; any labelled sample needs the class map
    needed = any(s.labelled and s.num_samples for s in splits.values())
    if not isinstance(classes, list) or (needed and not classes):
        raise InfoError(f"{path}: no 'classes' list; the class map is needed for num_classes")
    for split in splits.values():
        if split.class_counts is not None and len(split.class_counts) != len(classes):
            raise InfoError(f"{path}: split {split.name!r}: {len(split.class_counts)} 'class_counts' for "
                            f"{len(classes)} classes")
    features = raw.get("features") or []
    return ShardInfo(Path(root), tuple(str(c) for c in classes), splits, tuple(str(f) for f in features))


def _split(path: Path, name: str, entry: object) -> SplitInfo:
    if not isinstance(entry, dict):
        raise InfoError(f"{path}: split {name!r} is not a mapping")
    labelled = entry.get("labelled", True)
    if not isinstance(labelled, bool):
        raise InfoError(f"{path}: split {name!r}: 'labelled' is {labelled!r}, not true or false")
    try:
        if "shards" in entry:  # taxotrain's layout
            shards = tuple(ShardEntry(str(s["filename"]), int(s["num_samples"]), _opt_int(s.get("bytes")),
                                      s.get("sha256"), s.get("index"), s.get("index_sha256"))
                           for s in entry["shards"])
            _same_lengths(path, name, entry, shards)
            return SplitInfo(name, shards, labelled, _class_counts(path, name, entry))
        names, lengths = entry.get("filenames"), entry.get("shard_lengths")
        if not isinstance(names, list) or not isinstance(lengths, list) or len(names) != len(lengths):
            raise InfoError(f"{path}: split {name!r} needs 'filenames' and 'shard_lengths' of equal length")
        return SplitInfo(name, tuple(ShardEntry(str(n), int(k)) for n, k in zip(names, lengths)), labelled)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, InfoError):
            raise
        raise InfoError(f"{path}: split {name!r} has a malformed shard entry ({err!r})") from None


def _same_lengths(path: Path, name: str, entry: dict, shards: tuple[ShardEntry, ...]) -> None:
    """timm reads `filenames`/`shard_lengths`, taxotrain `shards`: they must tell the same story."""
    names, lengths = entry.get("filenames"), entry.get("shard_lengths")
    if names is None and lengths is None:
        return
    if list(names or []) != [s.filename for s in shards] or \
            [int(k) for k in lengths or []] != [s.num_samples for s in shards]:
        raise InfoError(f"{path}: split {name!r}: 'filenames'/'shard_lengths' and 'shards' disagree")


def _class_counts(path: Path, name: str, entry: dict) -> tuple[int, ...] | None:
    """`class_counts` where recorded, for loss weights and frequency reports. Not checked against the
    shard lengths: they weigh and bin classes, and a wrong count there corrupts no sample."""
    counts = entry.get("class_counts")
    if counts is None:
        return None
    if not isinstance(counts, list) or any(isinstance(k, bool) or not isinstance(k, int) or k < 0
                                           for k in counts):
        raise InfoError(f"{path}: split {name!r}: 'class_counts' must be a list of counts >= 0")
    return tuple(counts)


def _opt_int(value: object) -> int | None:
    return None if value is None else int(value)
