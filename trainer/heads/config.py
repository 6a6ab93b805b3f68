"""The schema of `taxotrain-head`: a classical classifier on the features that `launch.features` exported.

Checked once at start-up by `trainer.runtime.cli` (`__post_init__`, naming the key), before any fit.
`head=random_forest|linear_svm|logistic` picks a preset of `conf/head/`; every setting below it can be
overridden (`head.scheme=ovo`, `head.c=[0.1,1]`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import LoggerConfig, LoggerMode
from trainer.runtime.choices import Choice
from trainer.runtime.exits import require


class HeadKind(Choice):
    random_forest = "random_forest"  # EcoTaxa 2.8's classifier: native probabilities, no scaling needed
    linear_svm = "linear_svm"        # the Spark pets seed's classifier: probabilities calibrated (sigmoid)
    logistic = "logistic"            # multinomial logistic regression: native probabilities


class Scheme(Choice):
    ovr = "ovr"  # one-vs-rest: one classifier per class
    ovo = "ovo"  # one-vs-one: one classifier per pair of classes, and a table of every pair's accuracy


class ClassWeight(Choice):
    none = "none"
    balanced = "balanced"  # n_samples / (n_classes * count): rare classes weigh as much as common ones


class Inputs(Choice):
    native = "native"  # the instrument's measurements (imputed where missing)
    deep = "deep"      # the bag's embeddings (every exported array side by side)
    both = "both"      # native + deep: EcoTaxa 2.8's recipe with head.pca > 0


class Engine(Choice):
    sklearn = "sklearn"  # one node, every core (n_jobs)
    spark = "spark"      # PySpark MLlib on parquet features: tables larger than one node's memory


@dataclass
class HeadModel:
    kind: HeadKind = HeadKind.random_forest
    scheme: Scheme = Scheme.ovr     # linear_svm only
    class_weight: ClassWeight = ClassWeight.none
    c: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # linear_svm, logistic: searched
    trees: int = 300                # random_forest
    min_samples_leaf: list[int] = field(default_factory=lambda: [1, 3])  # random_forest: searched
    # a fraction of the input columns (sklearn's sqrt would be 0.04 of 600 deep columns)
    max_features: list[float] = field(default_factory=lambda: [0.1, 0.3])  # random_forest: searched
    max_iter: int = 2000            # linear_svm, logistic

    def __post_init__(self) -> None:
        require(self.scheme == Scheme.ovr or self.kind == HeadKind.linear_svm, "head.scheme",
                f"one-vs-one is for head=linear_svm, not {self.kind}")
        require(bool(self.c) and all(c > 0 for c in self.c), "head.c", f"must be values > 0, got {self.c}")
        require(self.trees > 0, "head.trees", f"must be > 0, got {self.trees}")
        require(bool(self.min_samples_leaf) and all(n >= 1 for n in self.min_samples_leaf),
                "head.min_samples_leaf", f"must be values >= 1, got {self.min_samples_leaf}")
        require(bool(self.max_features) and all(0 < f <= 1 for f in self.max_features),
                "head.max_features", f"must be fractions in (0, 1], got {self.max_features}")
        require(self.max_iter > 0, "head.max_iter", "must be > 0")

    def grid(self) -> list[dict]:
        """The candidates of the search on the validation split, in a fixed order."""
        if self.kind == HeadKind.random_forest:
            return [{"min_samples_leaf": n, "max_features": f}
                    for n in self.min_samples_leaf for f in self.max_features]
        return [{"c": c} for c in self.c]


@dataclass
class SparkConfig:
    master: str | None = None       # null: local[<cores>]; spark://host:7077 under slurm/head.sbatch
    driver_memory: str = "4g"
    executor_memory: str = "4g"
    partitions: int = 0             # 0: Spark's default; else repartition the training table

    def resolved_master(self) -> str:
        return self.master or f"local[{os.cpu_count() or 1}]"


@dataclass
class HeadRunConfig:
    features: str = "???"           # a folder written by launch.features (features.json)
    head: HeadModel = field(default_factory=HeadModel)
    inputs: Inputs = Inputs.both    # native | deep | both
    pca: int = 50                   # components of the deep part, fitted on train only; 0: no PCA
    engine: Engine = Engine.sklearn
    spark: SparkConfig = field(default_factory=SparkConfig)
    train_split: str = "train"
    val_split: str = "val"          # the search, and the acceptance thresholds
    test_split: str = "test"        # the report and the comparison
    search_rows: int = 20_000       # training rows the search fits on; the chosen settings refit on all
    n_jobs: int = -1                # sklearn: -1 = every core
    seed: int = 0
    target_precision: float = 0.95  # acceptance thresholds per class, fitted on val (as taxotrain-calibrate)
    min_samples: int = 20           # classes predicted fewer times on val use the global threshold
    frequency_bins: list[int] = field(default_factory=lambda: [20, 100])  # as taxotrain-evaluate
    curve: list[float] = field(default_factory=list)  # nested training fractions, e.g. [0.1,0.3,1]; []: none
    bag: str | None = None          # the bag compared with: only the one features.json names is accepted
    bag_report: str | None = None   # the bag's report.json on the test split; default <bag>/report.json
    out: str | None = None          # default: <features>/heads/<kind>-<scheme>-<inputs>
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode=LoggerMode.disabled))

    def __post_init__(self) -> None:
        require((Path(self.features) / "features.json").is_file(), "features",
                f"{self.features} has no features.json (write it with taxotrain-features)")
        require(self.pca >= 0, "pca", f"must be 0 (off) or a number of components, got {self.pca}")
        require(self.search_rows >= 10, "search_rows", f"must be >= 10, got {self.search_rows}")
        require(self.n_jobs != 0, "n_jobs", "must be -1 (every core) or a number of processes")
        require(0 < self.target_precision < 1, "target_precision",
                f"must be in (0, 1), got {self.target_precision}")
        require(self.min_samples >= 1, "min_samples", f"must be >= 1, got {self.min_samples}")
        bins = self.frequency_bins
        require(len(bins) > 0 and bins[0] > 0 and all(a < b for a, b in zip(bins, bins[1:])),
                "frequency_bins", f"must be one or more increasing training counts > 0, got {bins}")
        require(all(0 < f <= 1 for f in self.curve) and list(self.curve) == sorted(set(self.curve)),
                "curve", f"must be increasing fractions in (0, 1], got {self.curve}")
        splits = [self.train_split, self.val_split, self.test_split]
        require(len(set(splits)) == 3, "test_split", f"train, val and test splits must differ, got {splits}")

    def name(self) -> str:
        scheme = f"-{self.head.scheme}" if self.head.kind == HeadKind.linear_svm else ""
        return f"{self.head.kind}{scheme}-{self.inputs}"

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.features) / "heads" / self.name()
