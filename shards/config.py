"""Typed schema of `conf/shard.yaml`, validated once at start-up.

Hydra type-checks overrides against these dataclasses (a misspelt key or a wrong type fails
before any work); `__post_init__` checks the values, naming the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from shards.ecotaxa import kept_statuses
from shards.items import SPLITS
from trainer.runtime.choices import Choice
from trainer.runtime.exits import require

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


class Stage(Choice):
    all = "all"            # plan, write and finalize in one process
    write = "write"        # an array task: write its shards only
    finalize = "finalize"  # once every task has written: the manifest


@dataclass
class SourceConfig:
    kind: str = "imagefolder"
    # pin the class list (one name per line); otherwise sorted class names
    classes: str | None = None


@dataclass
class LabelledSource(SourceConfig):
    # table with header from,to (or fine,coarse): regroups fine classes into coarse ones (chains resolve)
    class_map: str | None = None


@dataclass
class ImageFolderSource(LabelledSource):
    kind: str = "imagefolder"
    root: str = "???"


@dataclass
class CsvSource(LabelledSource):
    kind: str = "csv"
    path: str = "???"
    # image paths in the table are relative to this folder (default: the table's folder)
    root: str | None = None
    path_column: str = "path"
    # null: no labels, every row goes to the unlabelled set (source.unlabelled)
    label_column: str | None = "label"
    split_column: str | None = None
    # optional stable id (EcoTaxa `object_id`); the sample key is derived from it, the .json keeps it
    key_column: str | None = None
    feature_columns: list[str] = field(default_factory=list)
    # None = detect from the file name and the first line
    delimiter: str | None = None
    # annotation status of each row; null = object_annotation_status when the table has it
    status_column: str | None = None
    # rows with one of these statuses (and a category) are labelled: validated predicted dubious unclassified
    keep_status: list[str] = field(default_factory=lambda: ["validated"])
    # split name for the rows not labelled, written without .cls; null = not written, counted as excluded
    unlabelled: str | None = None

    def __post_init__(self) -> None:
        kept_statuses(self.keep_status)
        check_unlabelled_name(self.unlabelled)
        require(self.label_column is not None or self.unlabelled is not None, "source.unlabelled",
                "source.label_column is null, so every row is unlabelled and nothing would be written: "
                "set source.unlabelled=unlabelled")


@dataclass
class ImagesSource(SourceConfig):
    """Every image under `root`, as one unlabelled set (images to classify)."""

    kind: str = "images"
    root: str = "???"
    # split name of the set; its shards are NAME-000000.tar, samples without .cls
    unlabelled: str = "unlabelled"

    def __post_init__(self) -> None:
        require(self.unlabelled is not None, "source.unlabelled", "an images source needs a split name")
        check_unlabelled_name(self.unlabelled)


def check_unlabelled_name(name: str | None) -> None:
    """The unlabelled set's name starts its shard names: a plain word that is no labelled split's."""
    if name is None:
        return
    require(_SPLIT_NAME.fullmatch(name) is not None, "source.unlabelled",
            f"{name!r} must be letters, digits, _ or - only")
    require(name.lower() not in SPLITS, "source.unlabelled",
            f"{name!r} is a labelled split's name; pick another (e.g. unlabelled)")


@dataclass
class DemoSource(LabelledSource):
    kind: str = "demo"
    # where the bundled MNIST digits are written out once as PNG class folders
    root: str = "~/.cache/taxotrain/demo-mnist"


class SplitMethod(Choice):
    # exact fractions per class: sorts each class's keys by hash, so it needs every item of the class
    stratified = "stratified"
    # a threshold on each key's own hash: no other item is needed, so array tasks that each list a share,
    # and later increments, all put one key in the same split (fractions then hold on average)
    key_hash = "key_hash"


@dataclass
class SplitConfig:
    val: float = 0.1
    test: float = 0.1
    method: SplitMethod = SplitMethod.stratified  # stratified | key_hash (partition=true needs key_hash)

    def __post_init__(self) -> None:
        require(0.0 <= self.val < 1.0, "split.val", f"must be in [0, 1), got {self.val}")
        require(0.0 <= self.test < 1.0, "split.test", f"must be in [0, 1), got {self.test}")
        require(self.val + self.test < 1.0, "split", "val + test must leave some training data")


@dataclass
class ShardSizeConfig:
    maxcount: int = 10_000
    # bytes of encoded images per shard, before tar headers
    maxsize: int = 1_000_000_000

    def __post_init__(self) -> None:
        require(self.maxcount > 0, "shard.maxcount", f"must be > 0, got {self.maxcount}")
        require(self.maxsize > 0, "shard.maxsize", f"must be > 0, got {self.maxsize}")


@dataclass
class ResizeConfig:
    # None = keep the original encoded bytes; otherwise images larger than this are re-encoded
    max_side: int | None = None
    quality: int = 90

    def __post_init__(self) -> None:
        require(self.max_side is None or self.max_side > 0, "resize.max_side", "must be > 0")
        require(1 <= self.quality <= 100, "resize.quality", f"must be in [1, 100], got {self.quality}")


@dataclass
class ShardConfig:
    source: Any = "???"
    out: str = "???"
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    shard: ShardSizeConfig = field(default_factory=ShardSizeConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    # images with more pixels are quarantined as decompression bombs (PIL's default limit)
    max_pixels: int = 89_478_485
    max_bad_fraction: float = 0.05
    workers: int = 1
    # SLURM array: this process writes shards with index % task_count == task_index;
    # stage=write skips the manifest, stage=finalize only writes it.
    task_index: int = 0
    task_count: int = 1
    stage: Stage = Stage.all
    # streaming build: each task lists only its share of the inputs (by key hash), plans, shuffles and
    # writes its own shards (SPLIT-pTTTT-NNNNNN.tar) and a task record; finalize merges the records.
    # Memory is bounded by the share, not the collection. Needs split.method=key_hash.
    partition: bool = False
    # add a batch of new objects (e.g. 2026-12) to a finished partitioned set as new shards
    # (SPLIT-NAME-pTTTT-NNNNNN.tar); old shards are not rewritten and old keys keep their split
    increment: str | None = None
    progress: bool | None = None  # a bar; None = when stderr is a terminal, else timed lines; false: none
    progress_every_s: float = 30.0  # seconds between progress lines (count, rate, ETA) without a bar; 0: none

    def __post_init__(self) -> None:
        require(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        require(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "must be in [0, 1]")
        require(self.max_pixels > 0, "max_pixels", "must be > 0")
        require(self.task_count >= 1, "task_count", "must be >= 1")
        require(0 <= self.task_index < self.task_count, "task_index",
                f"must be in [0, task_count={self.task_count}), got {self.task_index}")
        require(self.progress_every_s >= 0, "progress_every_s",
                f"must be >= 0 (0: no progress lines), got {self.progress_every_s}")
        require(not self.partition or self.split.method == SplitMethod.key_hash, "split.method",
                "partition=true needs split.method=key_hash: a per-class split needs every item of a "
                "class in one process, which a partitioned build never has")
        require(self.increment is None or self.partition, "increment",
                "an increment is added to a partitioned set: set partition=true (and split.method=key_hash)")
        require(self.increment is None or _SPLIT_NAME.fullmatch(self.increment) is not None, "increment",
                f"{self.increment!r} names shards: letters, digits, _ or - only")


@dataclass
class VerifyConfig:
    dir: str = "???"
    # also decode every image (slower); hashes and counts are always checked
    decode: bool = False


def register() -> None:
    """The source group's schemas; each tool's root schema is stored by `trainer.runtime.cli.tool`."""
    cs = ConfigStore.instance()
    cs.store(group="source", name="imagefolder_schema", node=ImageFolderSource)
    cs.store(group="source", name="csv_schema", node=CsvSource)
    cs.store(group="source", name="demo_schema", node=DemoSource)
    cs.store(group="source", name="images_schema", node=ImagesSource)
