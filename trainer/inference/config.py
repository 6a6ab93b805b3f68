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


class CalibrationUse(Choice):
    auto = "auto"    # the bag's calibration.json (temperatures, thresholds) when it has one
    none = "none"    # raw softmax; no object is accepted automatically


class PredictFormat(Choice):
    tsv = "tsv"
    csv = "csv"
    parquet = "parquet"
    ecotaxa = "ecotaxa"  # EcoTaxa's TSV import layout, keyed by object_id


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
    calibration: CalibrationUse = CalibrationUse.auto  # auto: the bag's calibration.json if any | none

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
    precisions: list[float] = field(default_factory=lambda: [0.95, 0.99])  # coverage reported at each
    exclude_classes: list[str] = field(default_factory=list)  # true classes left out of the summary
    confused_pairs: int = 20        # most confused (true, predicted) pairs listed in the report
    plot_classes: int = 40          # confusion.png shows all classes up to this many, else the most confused
    # rare / medium / common by each class's TRAINING count (the set's train split): rare < 20 <= medium
    # < 100 <= common; report["frequency"], report.md and recall_vs_count.png
    frequency_bins: list[int] = field(default_factory=lambda: [20, 100])
    plots: bool = True
    out: str | None = None          # default: the bag directory
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode=LoggerMode.disabled))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.confused_pairs >= 0, "confused_pairs", "must be >= 0")
        require(self.plot_classes >= 2, "plot_classes", "must be >= 2")
        bins = self.frequency_bins
        require(len(bins) > 0 and bins[0] > 0 and all(a < b for a, b in zip(bins, bins[1:])),
                "frequency_bins", f"must be one or more increasing training counts > 0, got {bins}")
        require(all(0 < p < 1 for p in self.precisions), "precisions",
                f"must be in (0, 1), got {self.precisions}")
        check_shard_set(self.data.shards, "data.shards", [("data.split", self.data.split)], labelled=True)


@dataclass
class CalibrateConfig(InferenceConfig):
    data: EvalData = field(default_factory=lambda: EvalData(split="val"))
    target_precision: float = 0.95  # per-class thresholds: accepted objects reach this precision on val
    min_samples: int = 20           # classes predicted fewer times on val use the global threshold
    max_samples: int = 50_000       # validation objects used for the fit (the first ones streamed)
    out: str | None = None          # default: <bag>/calibration.json, where the other tools look

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.target_precision < 1, "target_precision",
                f"must be in (0, 1), got {self.target_precision}")
        require(self.min_samples >= 1, "min_samples", f"must be >= 1, got {self.min_samples}")
        require(self.max_samples >= 100, "max_samples", f"must be >= 100, got {self.max_samples}")
        check_shard_set(self.data.shards, "data.shards", [("data.split", self.data.split)], labelled=True)

    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.bag) / "calibration.json"


@dataclass
class PredictConfig(InferenceConfig):
    input: str = "???"              # a folder of images, or a shard directory (_info.json)
    split: str = "test"             # shard input only
    out: str | None = None          # default: BAG/predictions.<format>; ecotaxa: BAG/ecotaxa_predictions.tsv
    format: PredictFormat | None = None  # tsv | csv | parquet | ecotaxa; None: from out's suffix, else tsv
    top_k: int = 5                  # classes per row; clipped to the number of classes

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.top_k > 0, "top_k", f"must be > 0, got {self.top_k}")
        require(Path(self.input).exists(), "input", f"{self.input} does not exist")
        require(not (self.out and Path(self.out).is_dir()), "out",
                f"{self.out} is a folder; give a file name such as predictions.tsv")
        # EcoTaxa's import picks up ecotaxa*.tsv only: another name would be ignored there without a word
        require(self.out_format() != "ecotaxa" or self.out_path().name.startswith("ecotaxa"), "out",
                f"format=ecotaxa: EcoTaxa imports only files named ecotaxa*.tsv, "
                f"got {self.out_path().name!r}")

    @property
    def is_shards(self) -> bool:
        return (Path(self.input) / "_info.json").is_file()

    def out_format(self) -> str:
        if self.format is not None:
            return str(self.format.value)
        suffix = Path(self.out).suffix.lower().lstrip(".") if self.out else ""
        return suffix if suffix in ("csv", "parquet") else "tsv"

    def out_path(self) -> Path:
        from trainer.inference.outputs import default_name

        return Path(self.out) if self.out else Path(self.bag) / default_name(self.out_format())


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
