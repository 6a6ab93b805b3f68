"""`head.engine=spark`: the MLlib head in local[2] mode, on the digits features of `head_features.py`.

One SparkSession for the module (the engine uses an active session and leaves it running; started per
fit it would cost a JVM start each time). Outside CI a Spark that cannot start skips these tests with
the reason; with CI=true it fails them, as the SLURM tests do. Also here: `bash -n slurm/head.sbatch`.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from head_features import make_features
from slurm_cluster import in_ci

from trainer.heads import engine, table
from trainer.heads.config import HeadModel, HeadRunConfig, SparkConfig
from trainer.runtime.exits import ConfigError

try:
    from trainer.heads import spark_engine
except ImportError as err:  # pyspark missing: the same rule as a JVM that does not start
    if in_ci():
        raise
    pytest.skip(f"pyspark not importable: {err}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SPLITS = ["train", "val", "test"]
# The SVMs are many small MLlib fits (10 for one-vs-rest, 45 for one-vs-one), each a few Spark jobs per
# iteration: on 1,078 rows the time is job overhead, so one partition and few iterations (the digits
# separate early) keep the module within minutes
ONE_PARTITION = SparkConfig(partitions=1)
# four of the ten digits: 6 one-vs-one pairs instead of 45, so the module stays within a few minutes of
# CI's 2 cores (ten classes took 16 minutes there under load); the logic is the same for any count
CLASSES = 4


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory):
    try:
        session = spark_engine.start_session(SparkConfig(master="local[2]", driver_memory="1g"),
                                             tmp_path_factory.mktemp("spark-local"))
    except ConfigError as err:
        if in_ci():
            pytest.fail(f"Spark did not start (CI=true, so this is a failure): {err}")
        pytest.skip(f"Spark did not start: {err}")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_features(tmp_path_factory.mktemp("digits") / "features", fmt="parquet", classes=CLASSES)


def load(root: Path) -> table.FeatureSet:
    return table.load(root, SPLITS, tuple(SPLITS))


def config(root: Path, **kw) -> HeadRunConfig:
    return HeadRunConfig(features=str(root), engine="spark", **kw)


# logistic with a real search: two candidates fitted on 600 of the 1,078 training rows, then a refit on
# all of them; the same settings serve the comparison with the sklearn engine
LOGISTIC = {"head": HeadModel(kind="logistic", c=[0.01, 1.0], max_iter=300), "inputs": "both", "pca": 20,
            "search_rows": 600}


@pytest.fixture(scope="module")
def logistic(spark, features: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[engine.Fitted, Path]:
    out = tmp_path_factory.mktemp("logistic")
    return spark_engine.fit(config(features, **LOGISTIC), load(features), out), out


def check_probs(fitted: engine.Fitted, data: table.FeatureSet) -> None:
    for split in ("val", "test"):
        probs = fitted.probs[split]
        assert probs.shape == (len(data.splits[split]), len(data.classes))
        assert np.all(probs >= 0) and np.allclose(probs.sum(1), 1.0)


def test_npz_features_are_refused_with_the_export_to_use(tmp_path: Path):
    root = make_features(tmp_path / "npz", fmt="npz", classes=CLASSES)
    with pytest.raises(ConfigError, match="format=parquet"):
        spark_engine.fit(config(root), load(root), tmp_path / "out")


def test_an_unreachable_master_names_spark_master(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"spark\.master: no Spark master answers at spark://127\.0\.0\.1:9"):
        spark_engine.start_session(SparkConfig(master="spark://127.0.0.1:9"), tmp_path)


def test_logistic_searches_refits_and_saves_a_model_that_predicts_the_same(logistic, features: Path):
    fitted, out = logistic
    data = load(features)
    check_probs(fitted, data)
    assert [s["params"] for s in fitted.search] == [{"c": 0.01}, {"c": 1.0}]
    assert fitted.params == fitted.search[engine.best_candidate(fitted.search)]["params"]
    assert engine.top1(fitted.probs["test"], data.splits["test"].labels) > 0.9
    # the missing native values, counted per column and split, are the NaNs of the files
    for split in SPLITS:
        native, _ = data.matrix(split, "both")
        assert fitted.imputed[split] == dict(zip(data.native_names, np.isnan(native).sum(0).tolist()))
    assert fitted.fit_s > 0 and fitted.fit_rows_per_s > 0 and fitted.predict_rows_per_s > 0
    assert fitted.model_files == ["spark-model", "spark-head.json"]
    assert (out / "spark-model" / "metadata").is_dir()
    assert not list(out.glob(".*")), "no temporaries left beside the model"
    # the saved head, loaded again (MLlib's format + the JSON), gives the probabilities of the fit
    predictor = spark_engine.load_predictor(out)
    native, deep = data.matrix("test", "both")
    np.testing.assert_allclose(predictor(native, deep), fitted.probs["test"], atol=1e-9)
    predictor.close()


def test_linear_svm_one_vs_rest_gives_calibrated_probabilities(spark, features: Path, tmp_path: Path):
    data = load(features)
    cfg = config(features, head=HeadModel(kind="linear_svm", c=[1.0], max_iter=20), inputs="deep", pca=0,
                 spark=ONE_PARTITION)
    fitted = spark_engine.fit(cfg, data, tmp_path)
    check_probs(fitted, data)
    assert engine.top1(fitted.probs["test"], data.splits["test"].labels) > 0.85
    assert fitted.imputed == {}  # inputs=deep: no native column read
    record = json.loads((tmp_path / "spark-head.json").read_text())
    assert len(record["platt"]) == CLASSES and record["pairs"] == []


def test_linear_svm_one_vs_one_scores_every_pair(spark, features: Path, tmp_path: Path):
    data = load(features)
    cfg = config(features, head=HeadModel(kind="linear_svm", scheme="ovo", c=[1.0], max_iter=10),
                 inputs="deep", pca=0, spark=ONE_PARTITION)
    fitted = spark_engine.fit(cfg, data, tmp_path)
    check_probs(fitted, data)
    labels = data.splits["test"].labels
    assert engine.top1(fitted.probs["test"], labels) > 0.85
    assert [(p["a"], p["b"]) for p in fitted.pairs] == [(a, b) for a in range(CLASSES)
                                                        for b in range(a + 1, CLASSES)]
    for pair in fitted.pairs:
        assert pair["n"] == int(np.isin(labels, [pair["a"], pair["b"]]).sum())
    # every test object belongs to the pairs of its class with each other class
    assert sum(p["n"] for p in fitted.pairs) == (CLASSES - 1) * len(labels)
    assert np.mean([p["accuracy"] for p in fitted.pairs]) > 0.95
    record = json.loads((tmp_path / "spark-head.json").read_text())
    assert [tuple(p) for p in record["pairs"]] == [(p["a"], p["b"]) for p in fitted.pairs]


def test_random_forest_with_balanced_weights(spark, features: Path, tmp_path: Path):
    data = load(features)
    head = HeadModel(kind="random_forest", trees=20, min_samples_leaf=[1], max_features=[0.3],
                     class_weight="balanced")
    fitted = spark_engine.fit(config(features, head=head, inputs="both", pca=0), data, tmp_path)
    check_probs(fitted, data)
    assert engine.top1(fitted.probs["test"], data.splits["test"].labels) > 0.8


def test_the_engines_agree_on_logistic_top1(logistic, features: Path, tmp_path: Path):
    from trainer.heads import sklearn_engine

    data = load(features)
    fitted, _ = logistic
    cfg = HeadRunConfig(features=str(features), engine="sklearn", n_jobs=1, **LOGISTIC)
    reference = sklearn_engine.fit(cfg, data, tmp_path)
    labels = data.splits["test"].labels
    spark_top1 = engine.top1(fitted.probs["test"], labels)
    sklearn_top1 = engine.top1(reference.probs["test"], labels)
    assert abs(spark_top1 - sklearn_top1) <= 0.02, (spark_top1, sklearn_top1)
    assert fitted.imputed == reference.imputed


def test_non_finite_embeddings_are_refused_naming_the_file(spark, features: Path, tmp_path: Path):
    root = tmp_path / "bad"
    root.mkdir()
    for path in features.iterdir():
        (root / path.name).write_bytes(path.read_bytes())
    val = pq.read_table(root / "features-val.parquet")
    column = val.column("member-00.5").to_numpy().copy()
    column[3] = np.nan
    val = val.set_column(val.schema.get_field_index("member-00.5"), "member-00.5", pa.array(column))
    pq.write_table(val, root / "features-val.parquet")
    with pytest.raises(ConfigError, match=r"features-val\.parquet has 1 rows with non-finite embeddings"):
        spark_engine.fit(config(root, inputs="deep", pca=0), load(root), tmp_path / "out")


def test_head_sbatch_is_valid_bash():
    script = REPO / "slurm" / "head.sbatch"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "launch.head engine=spark" in text and "trap" in text
