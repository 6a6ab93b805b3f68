"""taxotrain-head: the three kinds on real digits features, the report in evaluate's words, compare.md
against a real bag, predict head=DIR end to end, the skops file's refusal of foreign types, the
learning curve, and every bad input of issue 17 with its message and exit code."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from head_features import make_features
from omegaconf import OmegaConf
from test_bag import bag_config
from train_fixtures import write_shardset

from trainer.heads import model_file
from trainer.heads.config import HeadRunConfig
from trainer.heads.predict import run as predict_run
from trainer.heads.run import run
from trainer.inference.config import EvaluateConfig, FeaturesConfig, PredictConfig
from trainer.inference.evaluate import run as evaluate_run
from trainer.inference.features import run as features_run
from trainer.jobs.bag import train_bag
from trainer.runtime import distributed
from trainer.runtime.cli import typed
from trainer.runtime.exits import ConfigError

REPO = Path(__file__).resolve().parents[1]
METRICS = {"top1", "top5", "mrr", "balanced_acc", "nll", "ece", "per_class_recall"}


def head(features: Path, *overrides: str) -> HeadRunConfig:
    dots = [f"features={features}", "head.trees=60", "pca=16", "n_jobs=1", *overrides]
    return typed(HeadRunConfig, OmegaConf.from_dotlist(dots))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("heads") / "features")


@pytest.mark.parametrize("kind", ["random_forest", "logistic", "linear_svm"])
def test_each_kind_reports_in_evaluates_words(digits, kind):
    assert run(head(digits, f"head.kind={kind}")) == 0
    out = digits / "heads" / f"{kind}{'-ovr' if kind == 'linear_svm' else ''}-both"
    report = json.loads((out / "report.json").read_text())
    values = report["model"][out.name]
    assert METRICS <= set(values) and values["n"] == 360
    assert values["top1"] > 0.85, values["top1"]  # the digits are easy; a broken pipeline is not
    probs_rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["class"] for r in probs_rows] == [str(c) for c in range(10)]
    assert sum(int(r["support"]) for r in probs_rows) == 360
    assert (out / "reliability.png").stat().st_size > 1000
    assert report["imputed"]["train"]["ink"] > 0  # make_features leaves 5% missing
    assert len(report["search"]) == (4 if kind == "random_forest" else 3)  # the presets' grids
    assert out.name in (digits / "heads" / "compare.md").read_text()
    described = json.loads((out / "head.json").read_text())
    assert described["classes"] == report["classes"] and described["model_files"] == ["head.skops"]
    model = model_file.load(out / "head.skops")
    assert list(model.classes_) == list(range(10))


def test_one_vs_one_scores_every_pair_on_its_two_classes(digits):
    assert run(head(digits, "head=linear_svm", "head.kind=linear_svm", "head.scheme=ovo", "inputs=deep",
                    "head.c=[0.1]")) == 0
    out = digits / "heads" / "linear_svm-ovo-deep"
    report = json.loads((out / "report.json").read_text())
    pairs = report["pairs"]
    assert len(pairs) == 45
    labels = np.load(digits / "features-test.npz")["labels"]
    assert sum(p["n"] for p in pairs) == 9 * len(labels)  # each object is in the pairs of its class
    assert all(0 <= p["accuracy"] <= 1 for p in pairs) and np.mean([p["accuracy"] for p in pairs]) > 0.9
    assert len(list(csv.DictReader((out / "pairs.csv").open()))) == 45


def test_learning_curve_is_nested_and_grows(digits, tmp_path):
    assert run(head(digits, "head=logistic", "head.kind=logistic", "head.c=[1.0]", "curve=[0.1,0.5,1.0]",
                    f"out={tmp_path / 'h'}")) == 0
    rows = list(csv.DictReader((tmp_path / "h" / "head_curve.csv").open()))
    sizes = [int(r["train_images"]) for r in rows]
    assert sizes[0] < sizes[1] < sizes[2] == 1078
    assert float(rows[2]["top1"]) > float(rows[0]["top1"]) - 0.02
    assert (tmp_path / "h" / "head_curve.png").is_file()


def test_native_only_and_balanced_weights_run(digits, tmp_path):
    assert run(head(digits, "inputs=native", "head.class_weight=balanced", f"out={tmp_path / 'n'}")) == 0
    report = json.loads((tmp_path / "n" / "report.json").read_text())
    assert report["model"]["random_forest-native"]["top1"] > 0.13  # chance is 0.1: three crude measures


def test_a_skops_file_naming_foreign_types_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    sio.dump(Pipeline([("x", FunctionTransformer(os.system))]), tmp_path / "head.skops")
    with pytest.raises(ConfigError, match="outside scikit-learn and numpy"):
        model_file.load(tmp_path / "head.skops")


def test_the_benchmark_runs_every_head_the_issue_names(digits, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "heads_on_bag.py"), str(digits),
                           "--out", str(tmp_path / "b"), "head.trees=30", "pca=10", "n_jobs=1",
                           "head.c=[0.1]", "head.min_samples_leaf=[1]", "head.max_features=[0.3]"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "b" / "compare.md").read_text()
    for name in ("random_forest-native", "random_forest-deep", "random_forest-both", "linear_svm-ovr-both",
                 "linear_svm-ovo-both", "logistic-both"):
        assert f"| {name} |" in table and f"| {name} |" in done.stdout


def test_a_head_is_a_w_and_b_run_in_its_bags_group(digits, tmp_path, offline_wandb):
    from test_wandb import history, offline_runs, run_record

    out = tmp_path / "w"
    assert run(head(digits, "head=logistic", "head.kind=logistic", "head.c=[1.0]", "logger.mode=offline",
                    f"out={out}")) == 0
    (recs,) = offline_runs(out).values()
    record = run_record(recs)
    # make_features names a bag that is gone: its folder name is the group
    assert (record.run_group, record.job_type) == ("digits", "head")
    assert record.display_name == "digits/head-logistic-both"
    logged = history(recs)
    assert any("per_class" in row and "reliability" in row for row in logged)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["logistic-both/top1"] > 0.85


# ---------------------------------------------------------------- bad input


def _rewrite_npz(path: Path, **changes: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(path, **arrays)


def test_bad_inputs_get_a_clear_message(tmp_path):
    other = make_features(tmp_path / "other")
    with pytest.raises(ConfigError, match="exported from /bags/digits"):
        run(head(other, f"bag={tmp_path}"))

    unlabelled = make_features(tmp_path / "unlabelled")
    n = len(np.load(unlabelled / "features-train.npz")["labels"])
    _rewrite_npz(unlabelled / "features-train.npz", labels=np.full(n, -1, np.int64))
    with pytest.raises(ConfigError, match="no labels"):
        run(head(unlabelled))

    columns = make_features(tmp_path / "columns")
    _rewrite_npz(columns / "features-val.npz", native_names=np.array(["ink", "height", "area"]))
    with pytest.raises(ConfigError, match="features-val.npz has native columns.*the splits differ"):
        run(head(columns))

    single = make_features(tmp_path / "single")
    _rewrite_npz(single / "features-train.npz", labels=np.zeros(n, np.int64))
    with pytest.raises(ConfigError, match="1 class"):
        run(head(single))

    nonfinite = make_features(tmp_path / "nonfinite")
    with np.load(nonfinite / "features-test.npz") as z:
        emb = z["emb/member-00"].copy()
    emb[3, 5] = np.inf
    _rewrite_npz(nonfinite / "features-test.npz", **{"emb/member-00": emb})
    with pytest.raises(ConfigError, match="1 rows with non-finite embeddings"):
        run(head(nonfinite))


def test_a_test_class_unseen_in_training_is_reported_not_fatal(tmp_path):
    root = make_features(tmp_path / "unseen")
    with np.load(root / "features-train.npz") as z:
        labels = z["labels"].copy()
    keep = labels != 9
    arrays = {}
    with np.load(root / "features-train.npz") as z:
        arrays = {k: (z[k][keep] if z[k].ndim and len(z[k]) == len(labels) else z[k]) for k in z.files}
    np.savez(root / "features-train.npz", **arrays)
    assert run(head(root, "head=logistic", "head.kind=logistic", "head.c=[1.0]")) == 0
    report = json.loads((root / "heads" / "logistic-both" / "report.json").read_text())
    nines = int((np.load(root / "features-test.npz")["labels"] == 9).sum())
    assert report["unseen_in_training"] == {"9": nines}
    assert report["model"]["logistic-both"]["per_class_recall"][9] == 0.0
    assert "never saw" in (root / "heads" / "logistic-both" / "report.md").read_text()


def test_command_line_exits_2_naming_the_key(digits, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cases = [([f"features={tmp_path}"], "features"), ([f"features={digits}", "head=linear_svm", "head.c=[0]"],
                                                       "head.c"),
             ([f"features={digits}", "head.scheme=ovo"], "head.scheme")]
    for args, key in cases:
        done = subprocess.run([sys.executable, "-m", "launch.head", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert key in done.stdout + done.stderr


# ---------------------------------------------------------------- with a real bag


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, Path, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "select_device", lambda _local_rank: torch.device("cpu"))
        root = tmp_path_factory.mktemp("realbag")
        shards = write_shardset(root / "s", {"train": [16, 12], "val": [12], "test": [12, 10]},
                                features=("area", "perimeter"))
        bag = root / "bag"
        assert train_bag(bag_config(shards, bag, "bag.members=2")) == 0
        common = [f"bag={bag}", "workers=0", "batch_size=8"]
        assert evaluate_run(typed(EvaluateConfig, OmegaConf.from_dotlist(
            [*common, f"data.shards={shards}", "plots=false"]))) == 0
        assert features_run(typed(FeaturesConfig, OmegaConf.from_dotlist(
            [*common, f"data.shards={shards}", f"out={root / 'features'}"]))) == 0
        yield shards, bag, root / "features"
    torch.set_num_threads(threads)


def test_compare_sets_the_bag_beside_the_heads_and_predict_uses_the_head(real, tmp_path):
    shards, bag, features = real
    assert run(head(features, "pca=4", "head.min_samples_leaf=[1]", "head.max_features=[0.3]",
                    "frequency_bins=[10]")) == 0
    table = (features / "heads" / "compare.md").read_text()
    assert "| CNN member-00 |" in table and "| CNN ensemble |" in table and "| random_forest-both |" in table
    assert "rare top-1" in table

    out = tmp_path / "predictions.tsv"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "select_device", lambda _local_rank: torch.device("cpu"))
        chosen = features / "heads" / "random_forest-both"
        cfg = typed(PredictConfig, OmegaConf.from_dotlist([f"bag={bag}", f"input={shards}", "split=test",
                                                           f"head={chosen}", f"out={out}", "workers=0",
                                                           "top_k=2"]))
        assert predict_run(cfg) == 0
    rows = list(csv.DictReader(out.open(), delimiter="\t"))
    assert len(rows) == 22
    test = np.load(features / "features-test.npz")
    model = model_file.load(features / "heads" / "random_forest-both" / "head.skops")
    x = np.concatenate([test["native"], test["emb/member-00"], test["emb/member-01"]], axis=1)
    expected = model.predict_proba(x.astype(np.float64)).argmax(1)
    by_key = {r["key"]: r["class_1"] for r in rows}
    names = list(test["classes"])
    agree = np.mean([by_key[k] == names[c] for k, c in zip(test["keys"], expected)])
    assert agree == 1.0  # the embeddings predict computes are the ones features exported

    with pytest.raises(ConfigError, match="fitted on features of the bag"):
        predict_run(typed(PredictConfig, OmegaConf.from_dotlist(
            [f"bag={tmp_path}", f"input={shards}", f"head={features / 'heads' / 'random_forest-both'}",
             "workers=0"])))
