"""Deterministic split and shard plan: which item goes to which split and which shard.

Everything is a function of (seed, sample key), never of the listing order, so a rebuild,
another machine, or task i of a SLURM array all compute the same plan. Items of the unlabelled set
keep their given split (`source.unlabelled`) and are shuffled into their shards like the others.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass

from shards.config import ShardConfig, SplitConfig, SplitMethod
from shards.items import NO_STATUS, SPLITS, Collection, Item
from shards.keys import stable_hash


@dataclass(frozen=True)
class ShardPlan:
    name: str            # "train-000000.tar"
    split: str
    items: tuple[Item, ...]
    digest: str          # changes whenever anything that shapes the shard's bytes changes


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def key_split(key: str, split: SplitConfig, seed: int) -> str:
    """`split.method=key_hash`: the key's own hash against the fractions, whatever else is listed."""
    u = stable_hash(seed, "split", key) / 2.0**64
    return "test" if u < split.test else "val" if u < split.test + split.val else "train"


def assign_splits(col: Collection, split: SplitConfig, seed: int) -> dict[str, list[Item]]:
    """Stratified per class (or by key hash) unless the source gave each item its split; the
    unlabelled set last."""
    val, test = split.val, split.test
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    if col.unlabelled:
        out[col.unlabelled] = []
    for it in col.items:
        if it.split:
            out[it.split].append(it)
        elif split.method == SplitMethod.key_hash:
            out[key_split(it.key, split, seed)].append(it)
    by_class: dict[int, list[Item]] = defaultdict(list)
    for it in col.items:
        if not it.split and split.method == SplitMethod.stratified:
            by_class[it.label].append(it)
    for members in by_class.values():
        members.sort(key=lambda it: (stable_hash(seed, "split", it.key), it.key))
        n_test = min(_round(len(members) * test), len(members))
        n_val = min(_round(len(members) * val), len(members) - n_test)
        out["test"] += members[:n_test]
        out["val"] += members[n_test:n_test + n_val]
        out["train"] += members[n_test + n_val:]
    return out


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # missing or unreadable: the writer quarantines it


def make_plan(col: Collection, cfg: ShardConfig, prefix: str = "") -> list[ShardPlan]:
    """The shards of `col`, named SPLIT-PREFIXNNNNNN.tar (a partitioned task's prefix: its number)."""
    splits = assign_splits(col, cfg.split, cfg.seed)
    settings = json.dumps([cfg.resize.max_side, cfg.resize.quality, cfg.max_pixels,
                           col.classes, col.feature_names])
    plans = []
    for split, members in splits.items():
        # WebDataset readers shuffle only inside a buffer: shuffle the whole listing (a partitioned
        # task's share, itself a uniform sample of the collection) here
        items = sorted(members, key=lambda it: (stable_hash(cfg.seed, "order", it.key), it.key))
        # one stat per file: it both cuts the shards and enters their digests
        sizes = {it.key: _size(it.path) for it in items}
        # samples of the unlabelled set have no .cls: a shard that changes sides must be rewritten
        layout = settings if split in SPLITS else f"{settings}\nunlabelled"
        for index, chunk in enumerate(_chunks(items, sizes, cfg.shard.maxcount, cfg.shard.maxsize)):
            name = f"{split}-{prefix}{index:06d}.tar"
            plans.append(ShardPlan(name, split, tuple(chunk), _digest(name, chunk, sizes, layout)))
    return plans


def _chunks(items: list[Item], sizes: dict[str, int], maxcount: int, maxsize: int) -> list[list[Item]]:
    chunks: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for it in items:
        nbytes = sizes[it.key]
        if current and (len(current) >= maxcount or size + nbytes > maxsize):
            chunks.append(current)
            current, size = [], 0
        current.append(it)
        size += nbytes
    if current:
        chunks.append(current)
    return chunks


def _digest(name: str, items: list[Item], sizes: dict[str, int], settings: str) -> str:
    h = hashlib.sha256(f"{name}\n{settings}\n".encode())
    for it in items:
        h.update(f"{it.key}\t{it.path}\t{it.label}\t{it.features}\n".encode())
        if it.source_id or it.status != NO_STATUS:
            # both go into the sample's .json; tested apart so that older sets keep their digests
            h.update(f"{it.source_id}\t{it.status}\n".encode())
        h.update(f"{sizes[it.key]}\n".encode())
    return h.hexdigest()
