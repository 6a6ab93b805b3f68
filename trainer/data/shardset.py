"""One split of a shard directory, as `_info.json` (read by `shards.info`) describes it.

The manifest, not a directory listing, is the truth: a truncated tar still reads without error in
WebDataset, so only the recorded bytes, sha256 and sample counts can catch it before training.

Hashing every shard at every start does not scale: 37 TB on 64 ranks is ~580 GB per rank, again after
each requeue. A run therefore keeps stamps (`verified_shards.json` in its run directory): for each file
whose sha256 once matched the manifest, its size and mtime at that moment. A later start (a requeue, a
resume) hashes only the files without a stamp or whose size or mtime changed since; the others cost one
`stat`. What a stamp cannot see is a change that keeps both size and mtime (bit rot under an unchanged
mtime): `python -m shards.verify` hashes everything, and deleting the stamp file makes the next start do so.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shards.info import InfoError as ShardSetError  # noqa: F401 - what callers of load() catch
from shards.info import read_info
from shards.writer import index_path
from trainer.runtime.exits import RunFailure
from trainer.runtime.files import atomic_write, sha256_file

log = logging.getLogger(__name__)
STAMP_FILE = "verified_shards.json"


class ShardMismatch(RunFailure):
    """A shard's bytes differ from what the manifest recorded: the data is damaged (exit 1)."""


CheckMode = Literal["sha256", "size", "off"]


@dataclass(frozen=True)
class Shard:
    path: Path
    num_samples: int
    bytes: int | None = None
    sha256: str | None = None
    index_sha256: str | None = None  # of the `.idx` beside it; None where the manifest has none

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class ShardSet:
    root: Path
    split: str
    shards: tuple[Shard, ...]
    classes: tuple[str, ...]
    labelled: bool = True   # False: an unlabelled set (samples without .cls), for predict and features
    # samples per class in `classes` order, from _info.json; None where the manifest has none (timm's layout)
    class_counts: tuple[int, ...] | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load(root: str | Path, split: str) -> ShardSet:
    """The shards of `split`; an absent or empty split is an error that lists the splits present."""
    root = Path(root).expanduser()
    info = read_info(root)
    found = info.split(split)
    shards = tuple(Shard(root / s.filename, s.num_samples, s.bytes, s.sha256, s.index_sha256)
                   for s in found.shards)
    return ShardSet(root, split, shards, info.classes, found.labelled, found.class_counts)


class Stamps:
    """Files verified by sha256 before, keyed by absolute path: {"sha256", "bytes", "mtime_ns"} each."""

    def __init__(self, entries: dict[str, dict] | None = None) -> None:
        self.entries = dict(entries or {})
        self.fresh: dict[str, dict] = {}   # verified (hashed) by this check
        self.vouched = 0                   # files a stamp spared from hashing

    @classmethod
    def read(cls, path: Path | None) -> Stamps:
        if path is None or not path.is_file():
            return cls()
        try:
            entries = json.loads(path.read_text())
            assert isinstance(entries, dict) and all(isinstance(v, dict) for v in entries.values())
        except (OSError, ValueError, AssertionError):
            log.warning("ignoring unreadable %s: every shard is hashed again", path)
            return cls()
        return cls(entries)

    def vouches(self, path: Path, sha256: str) -> bool:
        entry = self.entries.get(str(path.resolve()))
        if entry is None or entry.get("sha256") != sha256:
            return False
        stat = path.stat()
        if (entry.get("bytes"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
            return False
        self.vouched += 1
        return True

    def record(self, path: Path, sha256: str, stat: os.stat_result) -> None:
        self.fresh[str(path.resolve())] = {"sha256": sha256, "bytes": stat.st_size,
                                           "mtime_ns": stat.st_mtime_ns}


def check(shards: Sequence[Shard], mode: CheckMode, stamps: Stamps | None = None) -> list[str]:
    """One line per shard or index file that disagrees with the manifest (missing, wrong size, wrong
    sha256). With `stamps`, a file stamped as verified with its current size and mtime is not hashed,
    and every file hashed and found good is recorded in `stamps.fresh`."""
    if mode not in ("sha256", "size", "off"):
        raise ValueError(f"data.check must be sha256, size or off, got {mode!r}")
    problems: list[str] = []
    if mode == "off":
        return problems
    for shard in shards:
        problem = _check_one(shard, mode, stamps)
        if problem:
            problems.append(f"{shard.path}: {problem}")
        problem = _check_index(shard, mode, stamps)
        if problem:
            problems.append(problem)
    return problems


def _hash_matches(path: Path, expected: str, stamps: Stamps | None) -> str | None:
    """None when `path`'s sha256 is `expected` (by a stamp, or hashed now); else the digest found."""
    if stamps is not None and stamps.vouches(path, expected):
        return None
    before = path.stat()
    digest = sha256_file(path)
    if digest != expected:
        return digest
    if stamps is not None:
        stamps.record(path, digest, before)  # the stat taken before hashing: a write meanwhile shows
    return None


def _check_one(shard: Shard, mode: CheckMode, stamps: Stamps | None = None) -> str | None:
    if not shard.path.is_file():
        return "missing"
    size = shard.path.stat().st_size
    if shard.bytes is not None and size != shard.bytes:
        return f"{size} bytes, manifest says {shard.bytes} (truncated or rewritten?)"
    if mode == "sha256" and shard.sha256 is not None:
        digest = _hash_matches(shard.path, shard.sha256, stamps)
        if digest is not None:
            return f"sha256 {digest[:12]}..., manifest says {shard.sha256[:12]}..."
    return None


def _check_index(shard: Shard, mode: CheckMode, stamps: Stamps | None = None) -> str | None:
    """The `.idx` the reader follows, where the manifest recorded its digest: its lines say which
    bytes are whose label, so an edited index mislabels samples of an intact tar."""
    if shard.index_sha256 is None:
        return None
    index = index_path(shard.path)
    if not index.is_file():
        return f"{index}: index of {shard.name} missing (the manifest records its sha256)"
    if mode == "sha256":
        digest = _hash_matches(index, shard.index_sha256, stamps)
        if digest is not None:
            return (f"{index}: sha256 {digest[:12]}..., manifest says {shard.index_sha256[:12]}... "
                    f"(edited or stale index of {shard.name})")
    return None


def check_across_ranks(shards: Sequence[Shard], mode: CheckMode, rank: int, world: int,
                       stamp_file: Path | None = None) -> None:
    """Every rank checks its share of `shards`; all ranks learn every problem, so all stop together
    (the training run and evaluate both check what they read before the first batch). With
    `stamp_file`, files stamped there are not hashed again, and rank 0 adds the newly verified ones."""
    from trainer.runtime import distributed  # the process group, when there is one

    stamps = Stamps.read(stamp_file) if mode == "sha256" and stamp_file is not None else None
    mine = check(shards[rank::world], mode, stamps)
    fresh = stamps.fresh if stamps is not None else {}
    vouched = stamps.vouched if stamps is not None else 0
    parts = distributed.gather((mine, fresh, vouched), everywhere=True)
    problems = [p for part, _, _ in parts for p in part]
    if problems:
        listing = "\n  ".join(problems)
        raise ShardMismatch(f"shards disagree with the manifest (data.check={mode}; off skips this):\n"
                            f"  {listing}")
    if stamps is None or stamp_file is None:
        return
    hashed = {k: v for _, part, _ in parts for k, v in part.items()}
    spared = sum(n for _, _, n in parts)
    if hashed and distributed.is_main():
        atomic_write(stamp_file, json.dumps({**stamps.entries, **hashed}, indent=0, sort_keys=True) + "\n")
    log.info("data.check=sha256: %d files hashed, %d spared by their stamps in %s", len(hashed), spared,
             stamp_file.name)
