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


class ExportFormat(Choice):
    safetensors = "safetensors"  # weights + JSON, rebuilt with taxotrain (load_exported_bag)
    onnx = "onnx"                # one graph per member (uint8 image in, probabilities out) + JSON


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
    # seconds between progress lines (count, rate, ETA) in a log; a terminal shows a bar; 0: no progress
    progress_every_s: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        require(self.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")
        require(self.progress_every_s >= 0, "progress_every_s",
                f"must be >= 0 (0: no progress), got {self.progress_every_s}")


@dataclass
class ExportConfig(BagChoice):
    out: str | None = None          # default: <bag>/export
    format: ExportFormat = ExportFormat.safetensors  # safetensors | onnx
    ensemble: bool = False          # format=onnx: also the whole bag as one graph, ensemble.onnx
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode=LoggerMode.disabled))  # artifact

    def __post_init__(self) -> None:
        super().__post_init__()
        require(not self.ensemble or self.format == ExportFormat.onnx, "ensemble",
                f"ensemble=true needs format=onnx, got format={self.format}")


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


class PredictStage(Choice):
    all = "all"      # predict; with parts=true, rank 0 then merges (one task only)
    write = "write"  # parts=true: this array task's parts only (slurm/predict.sbatch sets it in an array)
    merge = "merge"  # parts=true: manifest.json from every task's parts, after the array (no prediction)


@dataclass
class PredictConfig(InferenceConfig):
    input: str = "???"              # a folder of images, or a shard directory (_info.json)
    split: str = "test"             # shard input only
    out: str | None = None          # default: BAG/predictions.<format>; ecotaxa: BAG/ecotaxa_predictions.tsv
    format: PredictFormat | None = None  # tsv | csv | parquet | ecotaxa; None: from out's suffix, else tsv
    top_k: int = 5                  # classes per row; clipped to the number of classes
    head: str | None = None         # a head folder (taxotrain-head): it classifies the bag's embeddings
    # true: `out` is a folder (default BAG/predictions) of parquet parts, one per (array task, rank), each
    # streamed batch by batch, and manifest.json; shard input only (trainer/inference/parts.py)
    parts: bool = False
    stage: PredictStage = PredictStage.all  # parts: all | write (one array task) | merge (after the array)
    task_index: int = 0             # parts: this task predicts the split's shards with index % task_count ==
    task_count: int = 1             # task_index (a SLURM array, as shards.build)
    merge_file: bool = False        # parts: the merge also streams the parts into one predictions.<format>

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.top_k > 0, "top_k", f"must be > 0, got {self.top_k}")
        require(self.head is None or (Path(self.head) / "head.json").is_file(), "head",
                f"{self.head} has no head.json (write it with taxotrain-head)")
        require(Path(self.input).exists(), "input", f"{self.input} does not exist")
        self._check_tasks()
        if self.parts:
            self._check_parts()
            return
        require(not (self.out and Path(self.out).is_dir()), "out",
                f"{self.out} is a folder; give a file name such as predictions.tsv (or parts=true)")
        # EcoTaxa's import picks up ecotaxa*.tsv only: another name would be ignored there without a word
        require(self.out_format() != "ecotaxa" or self.out_path().name.startswith("ecotaxa"), "out",
                f"format=ecotaxa: EcoTaxa imports only files named ecotaxa*.tsv, "
                f"got {self.out_path().name!r}")

    def _check_tasks(self) -> None:
        require(self.task_count >= 1, "task_count", f"must be >= 1, got {self.task_count}")
        require(0 <= self.task_index < self.task_count, "task_index",
                f"must be in [0, task_count={self.task_count}), got {self.task_index}")
        for key, value, plain in (("stage", self.stage, self.stage == PredictStage.all),
                                  ("task_count", self.task_count, self.task_count == 1),
                                  ("merge_file", self.merge_file, not self.merge_file)):
            require(self.parts or plain, key, f"{value} needs parts=true (out is then a folder of parts)")

    def _check_parts(self) -> None:
        require(self.is_shards, "parts",
                f"needs shard input (a folder with _info.json); {self.input} is a folder of images, "
                f"predicted into one file with parts=false")
        require(self.stage != PredictStage.all or self.task_count == 1, "task_count",
                f"{self.task_count} tasks need stage=write (each array task), then stage=merge")
        require(not (self.out and Path(self.out).exists() and not Path(self.out).is_dir()), "out",
                f"parts=true: out is a folder of parts, but {self.out} is a file")

    @property
    def is_shards(self) -> bool:
        return (Path(self.input) / "_info.json").is_file()

    def out_format(self) -> str:
        if self.format is not None:
            return str(self.format.value)
        suffix = Path(self.out).suffix.lower().lstrip(".") if self.out and not self.parts else ""
        return suffix if suffix in ("csv", "parquet") else "tsv"

    def out_path(self) -> Path:
        """The predictions file; with parts, the folder of parts."""
        from trainer.inference.outputs import default_name

        if self.parts:
            return Path(self.out) if self.out else Path(self.bag) / "predictions"
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
    # true: each rank writes its rows of a split as files of about part_rows rows, into features-<split>/,
    # never gathering them; features.json lists the files (pca=0 only: it needs all of the first split)
    parts: bool = False
    part_rows: int = 100_000        # parts: rows per file; what a rank holds in memory at most (+ a batch)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.part_rows > 0, "part_rows", f"must be > 0, got {self.part_rows}")
        require(not (self.parts and self.pca), "pca",
                f"pca={self.pca} needs every row of {self.data.splits[0] if self.data.splits else 'train'} "
                f"in one process, which parts=true avoids: export without pca and let the head fit its "
                f"own (taxotrain-head pca=N), or use parts=false")
        require(bool(self.data.splits) and len(set(self.data.splits)) == len(self.data.splits),
                "data.splits", f"must list distinct splits, got {self.data.splits}")
        require(self.pca >= 0, "pca", f"must be 0 (off) or a number of components, got {self.pca}")
        require(self.max_bad_fraction is None or 0 <= self.max_bad_fraction < 1, "max_bad_fraction",
                f"must be in [0, 1), got {self.max_bad_fraction}")
        check_shard_set(self.data.shards, "data.shards", [("data.splits", s) for s in self.data.splits])

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.bag) / "features"
