"""Typed schemas of the tools that use a trained bag: export, evaluate, predict, features.

`BagChoice` says which members and checkpoints; `InferenceConfig` adds how they run (TTA, how the
members combine, batches, workers). Each tool's schema extends one of them, so a setting means the
same in every tool. Checked once at start-up by `trainer.runtime.cli` (`__post_init__`, naming the key).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import Check, LoggerConfig, LoggerMode, check_shard_set
from trainer.runtime.choices import Choice
from trainer.runtime.exits import require


class Checkpoint(Choice):
    best = "best"        # by validation top-1; the newest if there is none
    latest = "latest"


class TTA(Choice):
    none = "none"
    hflip = "hflip"
    fivecrop = "fivecrop"
    tencrop = "tencrop"


class Combine(Choice):
    mean = "mean"            # arithmetic mean of the members' probabilities
    geometric = "geometric"  # normalised geometric mean


class FeatureMode(Choice):
    per_member = "per_member"
    concat = "concat"


class FeatureFormat(Choice):
    npz = "npz"
    parquet = "parquet"


@dataclass
class BagChoice:
    bag: str = "???"                # a bag directory (bag.json) or one training run directory
    members: list[str] = field(default_factory=list)  # a subset by name; empty: every member
    checkpoint: Checkpoint = Checkpoint.best  # best (by validation top-1; newest if none) | latest

    def __post_init__(self) -> None:
        require(Path(self.bag).expanduser().is_dir(), "bag", f"{self.bag} is not a directory")


@dataclass
class InferenceConfig(BagChoice):
    tta: TTA = TTA.none             # none | hflip | fivecrop | tencrop: averaged over the views
    combine: Combine = Combine.mean  # mean | geometric, of the members' probabilities
    batch_size: int = 64
    workers: int = 2                # DataLoader processes per rank
    dist_timeout_s: float = 300.0   # collectives under torchrun or srun

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        require(self.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")


@dataclass
class ExportConfig(BagChoice):
    out: str | None = None          # default: <bag>/export


@dataclass
class EvalData:
    shards: str = "???"             # a folder written by shards.build
    split: str = "test"
    check: Check = Check.sha256     # compare the split's shards with the manifest first: sha256 | size | off


@dataclass
class EvaluateConfig(InferenceConfig):
    data: EvalData = field(default_factory=EvalData)
    exclude_classes: list[str] = field(default_factory=list)  # true classes left out of the summary
    confused_pairs: int = 20        # most confused (true, predicted) pairs listed in the report
    plot_classes: int = 40          # confusion.png shows all classes up to this many, else the most confused
    plots: bool = True
    out: str | None = None          # default: the bag directory
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode=LoggerMode.disabled))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.confused_pairs >= 0, "confused_pairs", "must be >= 0")
        require(self.plot_classes >= 2, "plot_classes", "must be >= 2")
        check_shard_set(self.data.shards, "data.shards", [("data.split", self.data.split)])


@dataclass
class PredictConfig(InferenceConfig):
    input: str = "???"              # a folder of images, or a shard directory (_info.json)
    split: str = "test"             # shard input only
    out: str | None = None          # default: BAG/predictions.tsv; a name ending in .csv writes CSV
    top_k: int = 5                  # classes per row; clipped to the number of classes

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.top_k > 0, "top_k", f"must be > 0, got {self.top_k}")
        require(Path(self.input).exists(), "input", f"{self.input} does not exist")
        require(not (self.out and Path(self.out).is_dir()), "out",
                f"{self.out} is a folder; give a file name such as predictions.tsv")

    @property
    def is_shards(self) -> bool:
        return (Path(self.input) / "_info.json").is_file()

    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.bag) / "predictions.tsv"


@dataclass
class FeatureData:
    shards: str = "???"             # a folder written by shards.build
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])  # PCA: fitted on the first


@dataclass
class FeaturesConfig(InferenceConfig):
    data: FeatureData = field(default_factory=FeatureData)
    mode: FeatureMode = FeatureMode.per_member  # per_member: emb/<member> each | concat: side by side
    format: FeatureFormat = FeatureFormat.npz   # npz | parquet (one flat table per split)
    pca: int = 0                    # 0: off; N: N components fitted on data.splits[0] only
    max_bad_fraction: float | None = None  # per shard; None: the first member's data.max_bad_fraction
    out: str | None = None          # default: <bag>/features

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.data.splits) and len(set(self.data.splits)) == len(self.data.splits),
                "data.splits", f"must list distinct splits, got {self.data.splits}")
        require(self.pca >= 0, "pca", f"must be 0 (off) or a number of components, got {self.pca}")
        require(self.max_bad_fraction is None or 0 <= self.max_bad_fraction < 1, "max_bad_fraction",
                f"must be in [0, 1), got {self.max_bad_fraction}")
        check_shard_set(self.data.shards, "data.shards", [("data.splits", s) for s in self.data.splits])

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.bag) / "features"
