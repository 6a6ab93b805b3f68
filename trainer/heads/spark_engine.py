"""`head.engine=spark`: the head as a PySpark MLlib pipeline, for feature tables larger than one node.

The same recipe as `sklearn_engine.py`, stage for stage: native columns imputed (`Imputer`, median of the
fitted training rows; Spark's median is approximate, relative error 0.001), the deep part reduced by a
`PCA` fitted on the training rows, everything standardised for the linear models, then the model. Only the
parquet export is read (`spark.read.parquet`, every executor reads its part), so the training split never
has to fit in the driver; what comes back to the driver is small: the search sample's keys, the Platt
sample's decision values and the [N, C] probabilities of val and test that `engine.py` asks for.

How sklearn's settings map (the objectives, per row): sklearn minimises `C * sum(loss) + |w|^2 / 2`, MLlib
`mean(loss) + regParam * |w|^2 / 2`, so `regParam = 1 / (C * n)` with n the rows of that fit (of the pair,
for one-vs-one). Same objective for the logistic regression; the linear SVM differs in its loss (MLlib's
LinearSVC has the hinge, sklearn's LinearSVC the squared hinge by default). Random forest: `numTrees`,
`minInstancesPerNode` = min_samples_leaf (both: rows each child keeps), `featureSubsetStrategy` = the
fraction; MLlib needs a depth limit and bins (`RF_MAX_DEPTH`, 32 bins) where sklearn grows unlimited
trees with exact thresholds.

Linear SVMs give no probabilities. Each class's decision value (one-vs-rest: its margin; one-vs-one:
votes plus the summed margins squashed into (-1/3, 1/3), so that ties go to the larger sum, as sklearn's
`OneVsOneClassifier` does) is mapped by Platt's sigmoid, fitted on a seeded sample of the training rows,
and the C sigmoids are normalised to sum to 1 (sklearn's `CalibratedClassifierCV` recipe). Out-of-fold
values, as sklearn uses, would cost three more fits of every pair on data that is large by assumption; a
linear model's training margins are only slightly optimistic when rows far outnumber its weights.

On disk (no pickle anywhere): `spark-model/`, MLlib's own format (JSON metadata + parquet) of one
`PipelineModel` (preprocessing + model, or + one LinearSVC per pair for one-vs-one), and `spark-head.json`
(the column names, class of each output, pair order, Platt's parameters), written last.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from py4j.protocol import Py4JJavaError
from pyspark.errors.exceptions.captured import AnalysisException, CapturedException
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LinearSVC, LogisticRegression, OneVsRest, RandomForestClassifier
from pyspark.ml.feature import PCA, Imputer, StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from scipy.optimize import minimize
from scipy.special import expit

from trainer.heads import engine
from trainer.heads.config import HeadKind, HeadRunConfig, Scheme, SparkConfig
from trainer.heads.engine import search_rows
from trainer.heads.table import FeatureSet
from trainer.runtime.exits import ConfigError, RunFailure
from trainer.runtime.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)
MODEL_DIR = "spark-model"
RECORD = "spark-head.json"
RF_MAX_DEPTH = 20       # MLlib's limit is 30; node statistics per level grow with depth, rows bound the rest
PLATT_ROWS = 100_000    # 2 parameters per class: far more rows than that adds time, not precision
PAIR_THREADS = 4        # one-vs-one fits are many small jobs: several in flight keep the executors busy
MASTER_WAIT_S = 5.0


# ------------------------------------------------------------------ the session


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_master(master: str) -> None:
    """A `spark://` master that does not answer is a bad command: Spark itself would retry for minutes."""
    if not master.startswith("spark://"):
        return
    for address in master.removeprefix("spark://").split(","):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=MASTER_WAIT_S).close()
            return
        except (OSError, ValueError):
            continue
    raise ConfigError(f"spark.master: no Spark master answers at {master} (start one, e.g. with "
                      f"slurm/head.sbatch, or leave spark.master unset for local mode)")


def start_session(spark: SparkConfig, local_dir: Path) -> SparkSession:
    """A new SparkSession from `spark` (no UI, quiet, scratch under `local_dir`); ConfigError naming
    spark.master and JAVA_HOME when the JVM or the master does not start."""
    master = spark.resolved_master()
    check_master(master)
    try:
        session = (SparkSession.builder.master(master).appName("taxotrain-head")
                   .config("spark.driver.memory", spark.driver_memory)
                   .config("spark.executor.memory", spark.executor_memory)
                   .config("spark.ui.enabled", "false")
                   .config("spark.ui.showConsoleProgress", "false")
                   .config("spark.local.dir", str(local_dir))
                   .getOrCreate())
    except Exception as err:  # py4j, PySparkRuntimeError, a JVM that never answered: one message for all
        java = os.environ.get("JAVA_HOME") or "unset"
        raise ConfigError(f"spark.master: Spark did not start on {master} ({first_line(err)}); it needs Java "
                          f"17+ (JAVA_HOME={java}, java on PATH: {shutil.which('java') or 'none'})") from None
    session.sparkContext.setLogLevel("ERROR")
    return session


@contextmanager
def session(spark: SparkConfig) -> Iterator[SparkSession]:
    """The caller's active session (a test's, left running), or a new one stopped on every path."""
    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    local_dir = Path(tempfile.mkdtemp(prefix="taxotrain-spark-"))
    try:
        started = start_session(spark, local_dir)
        try:
            yield started
        finally:
            started.stop()
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


# ------------------------------------------------------------------ reading and checking the splits


@dataclass
class Columns:
    """Parquet column names and the plain names the pipeline uses (MLlib reads a dot as a struct field)."""
    native: list[str]
    deep: list[str]

    @property
    def native_safe(self) -> list[str]:
        return [f"n{i}" for i in range(len(self.native))]

    @property
    def deep_safe(self) -> list[str]:
        return [f"d{j}" for j in range(len(self.deep))]

    def select(self) -> list[Column]:
        pairs = list(zip(self.native, self.native_safe)) + list(zip(self.deep, self.deep_safe))
        return [F.col("key"), F.col("label")] + [F.col(f"`{c}`").alias(s) for c, s in pairs]


def uri(path: Path) -> str:
    # explicit file: URIs, so a site's HADOOP_CONF_DIR (HDFS as the default filesystem) cannot redirect them
    return Path(path).resolve().as_uri()


def audit(frame: DataFrame, path: Path, names: list[str], cols: Columns) -> dict[str, int]:
    """Missing native values per column, in one pass that also refuses what table.py refuses."""
    inf = float("inf")
    exprs = [F.sum((F.col(c).isNull() | F.isnan(c)).cast("long")).alias(c) for c in cols.native_safe]
    if cols.native:
        exprs.append(F.sum(F.exists(F.array(*cols.native_safe), lambda x: F.abs(x) == inf).cast("long"))
                     .alias("inf_native"))
    if cols.deep:
        bad = F.exists(F.array(*cols.deep_safe), lambda x: x.isNull() | F.isnan(x) | (F.abs(x) == inf))
        exprs.append(F.sum(bad.cast("long")).alias("bad_deep"))
    row = frame.agg(*exprs).first().asDict()
    count = {k: int(v or 0) for k, v in row.items()}  # a sum over no rows is null
    if count.get("bad_deep"):
        raise ConfigError(f"features: {path} has {count['bad_deep']} rows with non-finite embeddings "
                          f"(NaN/inf): a diverged member? re-export from a healthy checkpoint")
    if count.get("inf_native"):
        raise ConfigError(f"features: {path} has {count['inf_native']} rows with infinite native values "
                          f"(missing ones are NaN and imputed; inf is not a measurement)")
    return {name: count[c] for name, c in zip(names, cols.native_safe)}


def check_labels(data: FeatureSet, split: str) -> None:
    labels = data.splits[split].labels
    bad = labels >= len(data.classes)
    if bad.any():
        raise ConfigError(f"features: {data.splits[split].path} has {int(bad.sum())} labels >= "
                          f"{len(data.classes)}, the number of classes features.json lists")


def present(frame: DataFrame, native: list[str]) -> list[str]:
    """The native columns with at least one value in `frame`: MLlib's Imputer has no median for a column
    without any (sklearn's imputes 0 there: a constant column, which carries nothing either)."""
    if not native:
        return []
    found = [F.count(F.when(F.col(c).isNotNull() & ~F.isnan(c), 1)).alias(c) for c in native]
    row = frame.agg(*found).first().asDict()
    empty = [c for c in native if not row[c]]
    if empty:
        log.warning("native columns %s have no value in the rows fitted: left out", empty)
    return [c for c in native if row[c]]


# ------------------------------------------------------------------ the head: pipeline, model, outputs


@dataclass
class Head:
    model: PipelineModel              # preprocessing + model(s)
    kind: str
    ovo: bool
    classes: list[int]                # the feature set's class of each output column
    native: list[str]                 # native columns (plain names) the Imputer fitted
    pairs: list[tuple[int, int]]      # one-vs-one: output columns (i, j) of each binary SVM; j is its 1
    platt: np.ndarray | None = None   # linear SVMs: [K, 2] sigmoid (A, B) per output column

    def column(self) -> Column:
        """The per-row output vector of a transformed frame: probabilities, or decision values (SVMs)."""
        if self.kind != HeadKind.linear_svm:
            return vector_to_array("probability")
        return ovo_scores(self.pairs, len(self.classes)) if self.ovo else vector_to_array("rawPrediction")

    def probabilities(self, values: np.ndarray) -> np.ndarray:
        return values if self.platt is None else platt_apply(values, self.platt)


def ovo_scores(pairs: list[tuple[int, int]], k: int) -> Column:
    """Votes per class plus its summed margins squashed into (-1/3, 1/3): ties go to the larger sum."""
    votes: list[list[Column]] = [[] for _ in range(k)]
    sums: list[list[Column]] = [[] for _ in range(k)]
    for p, (i, j) in enumerate(pairs):
        margin = vector_to_array(F.col(f"raw_{p}"))[1]
        won = (margin > 0).cast("double")
        votes[j].append(won)
        votes[i].append(1 - won)
        sums[j].append(margin)
        sums[i].append(-margin)
    scores = [sum(v, F.lit(0.0)) + sum(s, F.lit(0.0)) / (3 * (F.abs(sum(s, F.lit(0.0))) + 1))
              for v, s in zip(votes, sums)]
    return F.array(*scores)


def preprocess(cfg: HeadRunConfig, native: list[str], deep: list[str]) -> Pipeline:
    stages, parts = [], []
    if native:
        filled = [f"{c}_filled" for c in native]
        stages.append(Imputer(strategy="median", inputCols=native, outputCols=filled))
        parts += filled
    if deep and cfg.pca:
        stages += [VectorAssembler(inputCols=deep, outputCol="deep_vec"),
                   PCA(k=cfg.pca, inputCol="deep_vec", outputCol="deep_pca")]
        parts.append("deep_pca")
    elif deep:
        parts += deep
    if cfg.head.kind == HeadKind.random_forest:  # trees do not care about a column's scale
        return Pipeline(stages=stages + [VectorAssembler(inputCols=parts, outputCol="features")])
    return Pipeline(stages=stages + [VectorAssembler(inputCols=parts, outputCol="unscaled"),
                                     StandardScaler(inputCol="unscaled", outputCol="features",
                                                    withMean=True, withStd=True)])


def classifier(cfg: HeadRunConfig, params: dict, rows: int) -> object:
    """One candidate's MLlib estimator on (features, y[, w]); the mapping is in the module docstring."""
    head = cfg.head
    weight = {"weightCol": "w"} if head.class_weight == "balanced" else {}
    if head.kind == HeadKind.random_forest:
        return RandomForestClassifier(labelCol="y", numTrees=head.trees, maxDepth=RF_MAX_DEPTH,
                                      minInstancesPerNode=params["min_samples_leaf"],
                                      featureSubsetStrategy=str(params["max_features"]), seed=cfg.seed,
                                      **weight)
    reg = 1.0 / (params["c"] * rows)
    if head.kind == HeadKind.logistic:
        return LogisticRegression(labelCol="y", regParam=reg, elasticNetParam=0.0, maxIter=head.max_iter,
                                  standardization=False, **weight)  # StandardScaler did it
    svm = LinearSVC(regParam=reg, maxIter=head.max_iter, standardization=False)
    return OneVsRest(classifier=svm, labelCol="y", parallelism=PAIR_THREADS, **weight)


def with_targets(frame: DataFrame, labels: np.ndarray, classes: list[int]) -> DataFrame:
    """y: the output column of each row's class; w: sklearn's balanced weight n / (K * count)."""
    size = max(classes) + 1
    index = [float(classes.index(c)) if c in classes else -1.0 for c in range(size)]
    counts = np.bincount(labels, minlength=size)
    weight = [len(labels) / (len(classes) * n) if n else 0.0 for n in counts.tolist()]
    at = (F.col("label") + 1).cast("int")  # element_at counts from 1
    return (frame.withColumn("y", F.element_at(F.array(*map(F.lit, index)), at))
            .withColumn("w", F.element_at(F.array(*map(F.lit, weight)), at)))


def fit_pairs(cfg: HeadRunConfig, params: dict, feats: DataFrame, counts: list[int]) -> tuple[list, list]:
    """One binary LinearSVC per pair of output columns, on that pair's rows (its own regParam, its own
    balanced weights, as sklearn's OneVsOneClassifier clones the SVM per pair)."""
    pairs = [(i, j) for i in range(len(counts)) for j in range(i + 1, len(counts))]
    balanced = cfg.head.class_weight == "balanced"

    def one(p: int) -> object:
        i, j = pairs[p]
        n = counts[i] + counts[j]
        rows = feats.filter(F.col("y").isin(i, j)).withColumn("yb", (F.col("y") == j).cast("double"))
        if balanced:
            weight = F.when(F.col("yb") == 1, n / (2 * counts[j])).otherwise(n / (2 * counts[i]))
            rows = rows.withColumn("wb", weight)
        svm = LinearSVC(labelCol="yb", regParam=1.0 / (params["c"] * n), maxIter=cfg.head.max_iter,
                        standardization=False, rawPredictionCol=f"raw_{p}", predictionCol=f"pred_{p}",
                        **({"weightCol": "wb"} if balanced else {}))
        return svm.fit(rows)

    with ThreadPoolExecutor(PAIR_THREADS) as pool:
        return list(pool.map(one, range(len(pairs)))), pairs


def fit_head(cfg: HeadRunConfig, params: dict, frame: DataFrame, labels: np.ndarray, cols: Columns
             ) -> tuple[Head, float]:
    """One candidate fitted on `frame`, whose rows carry `labels` (numpy, from features.py's keys)."""
    start = time.perf_counter()
    classes = sorted(set(labels.tolist()))
    native = present(frame, cols.native_safe)
    if not native and not cols.deep:
        raise ConfigError(f"inputs: every native column is missing in the training rows, and inputs="
                          f"{cfg.inputs} has no deep part")
    framed = with_targets(frame, labels, classes)
    pre = preprocess(cfg, native, cols.deep_safe).fit(framed)
    feats = pre.transform(framed).select("y", "w", "features").persist()
    try:
        if feats.count() != len(labels):
            raise RunFailure(f"features: the training rows Spark read ({feats.count()}) are not the "
                             f"{len(labels)} rows of the split's keys (a file changed while read?)")
        ovo = cfg.head.kind == HeadKind.linear_svm and cfg.head.scheme == Scheme.ovo
        counts = np.bincount(labels, minlength=max(classes) + 1)[classes].tolist()
        if ovo:
            models, pairs = fit_pairs(cfg, params, feats, counts)
        else:
            models, pairs = [classifier(cfg, params, len(labels)).fit(feats)], []
        model = PipelineModel(stages=pre.stages + models)
        head = Head(model, str(cfg.head.kind), ovo, classes, native, pairs)
        if cfg.head.kind == HeadKind.linear_svm:
            head.platt = calibrate(head, PipelineModel(stages=models), feats, cfg.seed)
    finally:
        feats.unpersist()
    return head, time.perf_counter() - start


# ------------------------------------------------------------------ Platt's sigmoid for the SVMs


def sigmoid_fit(f: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(A, B) of p = 1 / (1 + exp(A f + B)) by maximum likelihood on Platt's smoothed targets (which
    keep a separable class from driving A to infinity)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    t = np.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        z = ab[0] * f + ab[1]
        g = t - expit(-z)  # d loss / d z
        return float(np.sum(np.logaddexp(0, z) - (1 - t) * z)), np.array([g @ f, g.sum()])

    start = np.array([0.0, np.log((n_neg + 1) / (n_pos + 1))])
    found = minimize(loss, start, jac=True, method="L-BFGS-B")
    return float(found.x[0]), float(found.x[1])


def platt_apply(values: np.ndarray, platt: np.ndarray) -> np.ndarray:
    p = expit(-(values * platt[:, 0] + platt[:, 1]))
    return p / p.sum(axis=1, keepdims=True)


def calibrate(head: Head, models: PipelineModel, feats: DataFrame, seed: int) -> np.ndarray:
    """Platt's (A, B) per output column, from the decision values of a seeded sample of training rows."""
    rows = feats.count()
    sample = feats.sample(fraction=min(1.0, PLATT_ROWS / max(rows, 1)), seed=seed)
    table = models.transform(sample).select(F.col("y"), head.column().alias("out")).toArrow()
    values = vectors(table, "out", len(head.classes))
    y = table.column("y").to_numpy()
    return np.array([sigmoid_fit(values[:, k], y == k) for k in range(len(head.classes))])


# ------------------------------------------------------------------ predictions on the driver


def vectors(table: object, column: str, width: int) -> np.ndarray:
    flat = np.asarray(table.column(column).combine_chunks().flatten(), np.float64)
    return flat.reshape(table.num_rows, width)


def key_order(found: np.ndarray, keys: np.ndarray, path: Path) -> np.ndarray:
    """Row of `found` for each of the split's keys, in the split's key order."""
    position = {k: i for i, k in enumerate(found.tolist())}
    if len(position) != len(found) or len(found) != len(keys):
        raise RunFailure(f"features: {path}: Spark read {len(found)} rows ({len(position)} distinct keys), "
                         f"the split lists {len(keys)}")
    try:
        return np.array([position[k] for k in keys.tolist()], np.int64)
    except KeyError as err:
        raise RunFailure(f"features: {path}: key {err} of the split is not among the rows Spark read"
                         ) from None


def predict(head: Head, frame: DataFrame, keys: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """[N, num_classes] probabilities in `keys`' order."""
    table = head.model.transform(frame).select("key", head.column().alias("out")).toArrow()
    values = vectors(table, "out", len(head.classes))
    order = key_order(table.column("key").to_numpy(zero_copy_only=False).astype(str), keys, path)
    return engine.full_probs(head.probabilities(values[order]), head.classes, num_classes)


def pair_table(head: Head, frame: DataFrame) -> list[dict]:
    """Each pair's binary SVM on the labelled objects of its two classes, in one pass (Fitted.pairs)."""
    exprs = []
    for p, (i, j) in enumerate(head.pairs):
        a, b = head.classes[i], head.classes[j]
        mine = F.col("label").isin(a, b)
        right = mine & (F.col(f"pred_{p}") == (F.col("label") == b).cast("double"))
        exprs += [F.sum(mine.cast("long")).alias(f"n{p}"), F.sum(right.cast("long")).alias(f"r{p}")]
    row = head.model.transform(frame.filter(F.col("label") >= 0)).agg(*exprs).first().asDict()
    table = []
    for p, (i, j) in enumerate(head.pairs):
        n, right = int(row[f"n{p}"] or 0), int(row[f"r{p}"] or 0)
        table.append({"a": head.classes[i], "b": head.classes[j], "n": n,
                      "accuracy": right / n if n else float("nan")})
    return table


# ------------------------------------------------------------------ the model on disk


def replace_dir(tmp: Path, final: Path) -> None:
    """`final` becomes `tmp`'s content: a reader sees the old model folder or the new one."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save(head: Head, out: Path, cfg: HeadRunConfig, data: FeatureSet, cols: Columns, params: dict
         ) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_DIR}.tmp-{os.getpid()}"
    head.model.write().overwrite().save(uri(tmp))
    replace_dir(tmp, out / MODEL_DIR)
    record = {"engine": "spark", "kind": head.kind, "scheme": str(cfg.head.scheme), "inputs": str(cfg.inputs),
              "params": params, "classes": data.classes, "model_classes": head.classes,
              "native_columns": cols.native, "deep_columns": cols.deep,
              "native_used": [cols.native[int(c[1:])] for c in head.native],
              "pairs": [[head.classes[i], head.classes[j]] for i, j in head.pairs],
              "platt": None if head.platt is None else head.platt.tolist(), "model": MODEL_DIR}
    # last: its presence vouches for the model folder
    atomic_write(out / RECORD, json.dumps(record, indent=1) + "\n")
    return [MODEL_DIR, RECORD]


# ------------------------------------------------------------------ engine.py's contract


def fit(cfg: HeadRunConfig, data: FeatureSet, out: Path) -> engine.Fitted:
    """engine.py's contract: search on val, refit on train, probabilities of val and test, the model."""
    if data.format != "parquet":
        raise ConfigError(f"engine: engine=spark reads parquet features, but {data.root} holds "
                          f"{data.format}; export them with taxotrain-features format=parquet (or use "
                          f"engine=sklearn)")
    with session(cfg.spark) as spark:
        try:
            return _fit(spark, cfg, data, out)
        except (Py4JJavaError, CapturedException) as err:  # failed in the JVM: executors, memory, disk
            if isinstance(err, AnalysisException):
                raise  # a query this module built wrongly: a bug, with its traceback
            cause = getattr(err, "java_exception", None) or err
            raise RunFailure(f"spark: a job failed on {spark.sparkContext.master} "
                             f"({first_line(cause)}); spark.executor_memory and "
                             f"spark.driver_memory set the memory") from err


def _fit(spark: SparkSession, cfg: HeadRunConfig, data: FeatureSet, out: Path) -> engine.Fitted:
    splits = (cfg.train_split, cfg.val_split, cfg.test_split)
    cols = Columns(*data.parquet_columns(cfg.inputs))
    frames = {s: spark.read.parquet(uri(data.splits[s].path)).select(*cols.select()) for s in splits}
    imputed = {s: audit(frames[s], data.splits[s].path, data.native_names, cols) for s in splits}
    for s in splits:
        check_labels(data, s)
    labels = data.splits[cfg.train_split].labels
    y = labels[labels >= 0]
    engine.check_training_labels(y, data.classes, cfg.train_split)
    subset = search_rows(y, cfg.search_rows, cfg.seed)
    if cols.deep and cfg.pca > min(len(cols.deep), len(subset)):
        raise ConfigError(f"pca: {cfg.pca} components, but the deep part has {len(cols.deep)} columns and "
                          f"the search fits on {len(subset)} rows")
    train = frames[cfg.train_split].filter(F.col("label") >= 0)
    train = (train.repartition(cfg.spark.partitions) if cfg.spark.partitions else train).persist()
    try:
        return _search_and_refit(spark, cfg, data, out, frames, train, y, subset, cols, imputed)
    finally:
        train.unpersist()


def _search_and_refit(spark: SparkSession, cfg: HeadRunConfig, data: FeatureSet, out: Path,
                      frames: dict[str, DataFrame], train: DataFrame, y: np.ndarray, subset: np.ndarray,
                      cols: Columns, imputed: dict) -> engine.Fitted:
    val, test = data.splits[cfg.val_split], data.splits[cfg.test_split]
    sample = train
    if len(subset) < len(y):  # the same seeded rows as sklearn_engine's search, chosen by key
        keys = data.splits[cfg.train_split].keys[data.splits[cfg.train_split].labels >= 0][subset]
        sample = train.join(F.broadcast(spark.createDataFrame([(k,) for k in keys.tolist()], ["key"])), "key")
    search, heads = [], []
    for params in cfg.head.grid():
        head, seconds = fit_head(cfg, params, sample, y[subset], cols)
        probs = predict(head, frames[cfg.val_split], val.keys, len(data.classes), val.path)
        search.append({"params": params, "val_top1": engine.top1(probs, val.labels),
                       "val_nll": engine.nll(probs, val.labels), "fit_s": seconds})
        heads.append(head)
        log.info("candidate %s: val top1 %.4f (fit %.1f s on %d rows)", params, search[-1]["val_top1"],
                 seconds, len(subset))
    chosen = engine.best_candidate(search)
    head, fit_s = heads[chosen], search[chosen]["fit_s"]
    if len(subset) < len(y):  # the search saw a sample: the chosen settings learn from every row
        head, fit_s = fit_head(cfg, search[chosen]["params"], train, y, cols)
    probs, start = {}, time.perf_counter()
    for split in (val, test):
        probs[split.name] = predict(head, frames[split.name], split.keys, len(data.classes), split.path)
    predict_s = time.perf_counter() - start
    pairs = pair_table(head, frames[cfg.test_split]) if head.ovo else []
    files = save(head, out, cfg, data, cols, search[chosen]["params"])
    return engine.Fitted(
        "spark", search[chosen]["params"], search, probs, pairs=pairs,
        imputed=imputed if cols.native else {}, fit_s=fit_s, fit_rows_per_s=len(y) / max(fit_s, 1e-9),
        predict_rows_per_s=(len(val) + len(test)) / max(predict_s, 1e-9), model_files=files)


# ------------------------------------------------------------------ a fitted head in use


class SparkPredictor:
    """`predictor(native [N, F] with NaN where missing, deep [N, D]) -> probabilities [N, C]` of a head
    that `fit` wrote into `out`; the columns are the ones features.json lists, in its order (all native
    ones, even those the head left out). Starts a local Spark session on first use; `close()` stops it."""

    def __init__(self, out: Path, spark: SparkConfig | None = None) -> None:
        path = Path(out) / RECORD
        try:
            self.record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"head: cannot read {path} ({err}): not a head fitted with engine=spark"
                              ) from None
        self.folder, self.spark = Path(out), spark or SparkConfig()
        self.head: Head | None = None
        self.local_dir: Path | None = None

    def _head(self) -> Head:
        if self.head is None:
            rec = self.record
            if SparkSession.getActiveSession() is None:
                self.local_dir = Path(tempfile.mkdtemp(prefix="taxotrain-spark-"))
                start_session(self.spark, self.local_dir)
            model = PipelineModel.load(uri(self.folder / rec["model"]))
            index = {c: i for i, c in enumerate(rec["model_classes"])}
            pairs = [(index[a], index[b]) for a, b in rec["pairs"]]
            native = [f"n{rec['native_columns'].index(c)}" for c in rec["native_used"]]
            platt = None if rec["platt"] is None else np.asarray(rec["platt"], np.float64)
            self.head = Head(model, rec["kind"], bool(pairs), rec["model_classes"], native, pairs, platt)
        return self.head

    def __call__(self, native: np.ndarray, deep: np.ndarray) -> np.ndarray:
        import pyarrow as pa

        rec = self.record
        widths = (len(rec["native_columns"]), len(rec["deep_columns"]))
        if native.shape[1:] != widths[:1] or deep.shape[1:] != widths[1:] or len(native) != len(deep):
            raise ConfigError(f"head: {self.folder} takes native [N, {widths[0]}] and deep [N, {widths[1]}], "
                              f"got {native.shape} and {deep.shape}")
        head = self._head()
        keys = np.array([str(i) for i in range(len(native))])
        columns = {"key": keys, "label": np.full(len(native), -1, np.int64)}
        columns |= {f"n{i}": native[:, i].astype(np.float64) for i in range(widths[0])}
        columns |= {f"d{j}": deep[:, j].astype(np.float64) for j in range(widths[1])}
        frame = SparkSession.getActiveSession().createDataFrame(pa.table(columns))
        return predict(head, frame, keys, len(rec["classes"]), self.folder / RECORD)

    def close(self) -> None:
        if self.local_dir is not None:
            active = SparkSession.getActiveSession()
            if active is not None:
                active.stop()
            shutil.rmtree(self.local_dir, ignore_errors=True)
            self.local_dir = None


def load_predictor(out: Path) -> SparkPredictor:
    return SparkPredictor(out)
