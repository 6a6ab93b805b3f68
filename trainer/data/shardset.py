"""One split of a shard directory, as `_info.json` (read by `shards.info`) describes it.

The manifest, not a directory listing, is the truth: a truncated tar still reads without error in
WebDataset, so only the recorded bytes, sha256 and sample counts can catch it before training.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shards.info import InfoError as ShardSetError  # noqa: F401 - what callers of load() catch
from shards.info import read_info
from shards.writer import index_path
from trainer.runtime.exits import RunFailure
from trainer.runtime.files import sha256_file


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


def check(shards: Sequence[Shard], mode: CheckMode) -> list[str]:
    """One line per shard or index file that disagrees with the manifest (missing, wrong size, wrong
    sha256)."""
    if mode not in ("sha256", "size", "off"):
        raise ValueError(f"data.check must be sha256, size or off, got {mode!r}")
    problems: list[str] = []
    if mode == "off":
        return problems
    for shard in shards:
        problem = _check_one(shard, mode)
        if problem:
            problems.append(f"{shard.path}: {problem}")
        problem = _check_index(shard, mode)
        if problem:
            problems.append(problem)
    return problems


def _check_one(shard: Shard, mode: CheckMode) -> str | None:
    if not shard.path.is_file():
        return "missing"
    size = shard.path.stat().st_size
    if shard.bytes is not None and size != shard.bytes:
        return f"{size} bytes, manifest says {shard.bytes} (truncated or rewritten?)"
    if mode == "sha256" and shard.sha256 is not None:
        digest = sha256_file(shard.path)
        if digest != shard.sha256:
            return f"sha256 {digest[:12]}..., manifest says {shard.sha256[:12]}..."
    return None


def _check_index(shard: Shard, mode: CheckMode) -> str | None:
    """The `.idx` the reader follows, where the manifest recorded its digest: its lines say which
    bytes are whose label, so an edited index mislabels samples of an intact tar."""
    if shard.index_sha256 is None:
        return None
    index = index_path(shard.path)
    if not index.is_file():
        return f"{index}: index of {shard.name} missing (the manifest records its sha256)"
    if mode == "sha256":
        digest = sha256_file(index)
        if digest != shard.index_sha256:
            return (f"{index}: sha256 {digest[:12]}..., manifest says {shard.index_sha256[:12]}... "
                    f"(edited or stale index of {shard.name})")
    return None


def check_across_ranks(shards: Sequence[Shard], mode: CheckMode, rank: int, world: int) -> None:
    """Every rank checks its share of `shards`; all ranks learn every problem, so all stop together
    (the training run and evaluate both check what they read before the first batch)."""
    from trainer.runtime import distributed  # the process group, when there is one

    mine = check(shards[rank::world], mode)
    problems = [p for part in distributed.gather(mine, everywhere=True) for p in part]
    if problems:
        listing = "\n  ".join(problems)
        raise ShardMismatch(f"shards disagree with the manifest (data.check={mode}; off skips this):\n"
                            f"  {listing}")
