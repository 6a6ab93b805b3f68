"""One split of a shard directory, as `_info.json` (written by `shards.build`) describes it.

The manifest, not a directory listing, is the truth: a truncated tar still reads without error in
WebDataset, so only the recorded bytes, sha256 and sample counts can catch it before training.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shards.manifest import INFO
from shards.writer import sha256_file

CheckMode = Literal["sha256", "size", "off"]


class ShardSetError(ValueError):
    """The shard directory or its manifest cannot be used; the message names the file or split."""


@dataclass(frozen=True)
class Shard:
    path: Path
    num_samples: int
    bytes: int | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class ShardSet:
    root: Path
    split: str
    shards: tuple[Shard, ...]
    classes: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_info(root: Path) -> dict:
    path = root / INFO
    if not path.is_file():
        raise ShardSetError(f"{path}: no shard manifest here; build shards with `python -m shards.build` "
                            "or point data.shards at the folder holding _info.json")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ShardSetError(f"{path}: unreadable manifest: {err}") from err
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ShardSetError(f"{path}: no 'splits' mapping (not a shards.build or timm manifest)")
    return info


def load(root: str | Path, split: str) -> ShardSet:
    """The shards of `split`; an absent or empty split is an error that lists the splits present."""
    root = Path(root).expanduser()
    info = read_info(root)
    splits = info["splits"]
    if split not in splits:
        raise ShardSetError(f"{root / INFO}: no split {split!r}; present: {sorted(splits)}")
    entry = splits[split]
    shards = tuple(_shards(root, split, entry))
    if not shards or sum(s.num_samples for s in shards) == 0:
        raise ShardSetError(f"{root / INFO}: split {split!r} has no samples")
    classes = info.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ShardSetError(f"{root / INFO}: no 'classes' list; the class map is needed for num_classes")
    return ShardSet(root, split, shards, tuple(str(c) for c in classes))


def _shards(root: Path, split: str, entry: dict) -> list[Shard]:
    # taxotrain manifests carry per-shard bytes and sha256; timm's layout only names and lengths
    if "shards" in entry:
        return [Shard(root / s["filename"], int(s["num_samples"]), s.get("bytes"), s.get("sha256"))
                for s in entry["shards"]]
    names, lengths = entry.get("filenames"), entry.get("shard_lengths")
    if not isinstance(names, list) or not isinstance(lengths, list) or len(names) != len(lengths):
        raise ShardSetError(f"{root / INFO}: split {split!r} needs 'filenames' and 'shard_lengths' "
                            "of equal length")
    return [Shard(root / n, int(k)) for n, k in zip(names, lengths)]


def check(shards: Sequence[Shard], mode: CheckMode) -> list[str]:
    """One line per shard that disagrees with the manifest (missing, wrong size, wrong sha256)."""
    if mode not in ("sha256", "size", "off"):
        raise ValueError(f"data.check must be sha256, size or off, got {mode!r}")
    problems: list[str] = []
    if mode == "off":
        return problems
    for shard in shards:
        problem = _check_one(shard, mode)
        if problem:
            problems.append(f"{shard.path}: {problem}")
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
