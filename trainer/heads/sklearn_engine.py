"""`head.engine=sklearn`: the head as one scikit-learn pipeline on one node, using every core.

The pipeline is the EcoTaxa 2.8 recipe made explicit: native columns imputed (median of the training
split) and, for the linear models, standardised; the deep part reduced by a PCA fitted on the training
rows only and standardised likewise; then the model. The forest and the logistic regression give their
own probabilities; a linear SVM has none, so it is wrapped in `CalibratedClassifierCV` (Platt's sigmoid on
out-of-fold decision values, one final SVM refit on all rows: `ensemble=False`, which also leaves a
single one-vs-one model whose pairs can be scored). The model is saved with skops (`model_file.py`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsOneClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from trainer.heads import engine, model_file
from trainer.heads.config import HeadKind, HeadRunConfig, Scheme
from trainer.heads.table import FeatureSet
from trainer.runtime.exits import ConfigError

log = logging.getLogger(__name__)
SVM_FOLDS = 3  # out-of-fold decision values for the sigmoid: sklearn's usual small number


def model(cfg: HeadRunConfig, params: dict) -> object:
    """The classifier of one candidate."""
    head = cfg.head
    weight = None if head.class_weight == "none" else "balanced"
    if head.kind == HeadKind.random_forest:
        return RandomForestClassifier(n_estimators=head.trees, min_samples_leaf=params["min_samples_leaf"],
                                      max_features=params["max_features"], class_weight=weight,
                                      n_jobs=cfg.n_jobs, random_state=cfg.seed)
    if head.kind == HeadKind.logistic:
        return LogisticRegression(C=params["c"], max_iter=head.max_iter, class_weight=weight)
    svm = LinearSVC(C=params["c"], max_iter=head.max_iter, class_weight=weight, random_state=cfg.seed)
    if head.scheme == Scheme.ovo:
        svm = OneVsOneClassifier(svm, n_jobs=cfg.n_jobs)
    return CalibratedClassifierCV(svm, method="sigmoid", cv=SVM_FOLDS, ensemble=False, n_jobs=cfg.n_jobs)


def pipeline(cfg: HeadRunConfig, params: dict, native: int, deep: int) -> Pipeline:
    """Columns [0, native) are the instrument's, [native, native + deep) the embeddings."""
    scale = cfg.head.kind != HeadKind.random_forest  # trees do not care about a column's scale
    parts = []
    if native:
        steps = [("impute", SimpleImputer(strategy="median", keep_empty_features=True))]
        parts.append(("native", Pipeline(steps + ([("scale", StandardScaler())] if scale else [])),
                      list(range(native))))
    if deep:
        steps = [("pca", PCA(cfg.pca, random_state=cfg.seed))] if cfg.pca else []
        steps += [("scale", StandardScaler())] if scale else []
        parts.append(("deep", Pipeline(steps) if steps else "passthrough",
                      list(range(native, native + deep))))
    return Pipeline([("columns", ColumnTransformer(parts)), ("model", model(cfg, params))])


def predict(pipe: Pipeline, x: np.ndarray, num_classes: int) -> np.ndarray:
    return engine.full_probs(pipe.predict_proba(x), [int(c) for c in pipe.classes_], num_classes)


def check_pca(cfg: HeadRunConfig, deep: int, rows: int) -> None:
    if deep and cfg.pca and cfg.pca > min(deep, rows):
        raise ConfigError(f"pca: {cfg.pca} components, but the deep part has {deep} columns and the search "
                          f"fits on {rows} rows")


def pairs(pipe: Pipeline, x: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Every pair's binary SVM scored on the test objects of its two classes (as the Spark seed did)."""
    ovo = pipe.named_steps["model"].calibrated_classifiers_[0].estimator
    z = pipe[:-1].transform(x)
    classes = [int(c) for c in ovo.classes_]
    table, k = [], 0
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            a, b = classes[i], classes[j]
            mine = (labels == a) | (labels == b)
            n = int(mine.sum())
            # sklearn's one-vs-one trains class j as 1 and class i as 0
            said = ovo.estimators_[k].predict(z[mine]) if n else np.zeros(0)
            right = np.where(said == 1, b, a) == labels[mine]
            table.append({"a": a, "b": b, "n": n, "accuracy": float(right.mean()) if n else float("nan")})
            k += 1
    return table


def fit(cfg: HeadRunConfig, data: FeatureSet, out: Path) -> engine.Fitted:
    """engine.py's contract: search on val, refit on train, probabilities of val and test, the model file."""
    arrays = {s: data.matrix(s, cfg.inputs) for s in (cfg.train_split, cfg.val_split, cfg.test_split)}
    labels = {s: data.splits[s].labels for s in arrays}
    known = labels[cfg.train_split] >= 0
    native, deep = (a[known] for a in arrays[cfg.train_split])
    y = labels[cfg.train_split][known]
    engine.check_training_labels(y, data.classes, cfg.train_split)
    x = {s: np.concatenate(a, axis=1) for s, a in arrays.items()}
    x_train = x[cfg.train_split][known]
    subset = engine.search_rows(y, cfg.search_rows, cfg.seed)
    check_pca(cfg, deep.shape[1], len(subset))
    widths = (native.shape[1], deep.shape[1])
    search, fitted = [], []
    for params in cfg.head.grid():
        pipe, seconds = _fit(pipeline(cfg, params, *widths), x_train[subset], y[subset])
        val = predict(pipe, x[cfg.val_split], len(data.classes))
        search.append({"params": params, "val_top1": engine.top1(val, labels[cfg.val_split]),
                       "val_nll": engine.nll(val, labels[cfg.val_split]), "fit_s": seconds})
        fitted.append(pipe)
        log.info("candidate %s: val top1 %.4f (fit %.1f s on %d rows)", params, search[-1]["val_top1"],
                 seconds, len(subset))
    chosen = engine.best_candidate(search)
    pipe, fit_s = fitted[chosen], search[chosen]["fit_s"]
    if len(subset) < len(y):  # the search saw a sample: the chosen settings learn from every row
        pipe, fit_s = _fit(pipeline(cfg, search[chosen]["params"], *widths), x_train, y)
    probs, predict_s = {}, 0.0
    for split in (cfg.val_split, cfg.test_split):
        start = time.perf_counter()
        probs[split] = predict(pipe, x[split], len(data.classes))
        predict_s += time.perf_counter() - start
    predicted = sum(len(p) for p in probs.values())
    files = [model_file.save(pipe, out)]
    ovo = cfg.head.kind == HeadKind.linear_svm and cfg.head.scheme == Scheme.ovo
    return engine.Fitted(
        "sklearn", search[chosen]["params"], search, probs,
        pairs=pairs(pipe, x[cfg.test_split], labels[cfg.test_split]) if ovo else [],
        imputed={s: dict(zip(data.native_names, np.isnan(a[0]).sum(0).tolist())) for s, a in arrays.items()
                 if a[0].shape[1]},
        fit_s=fit_s, fit_rows_per_s=len(y) / max(fit_s, 1e-9),
        predict_rows_per_s=predicted / max(predict_s, 1e-9), model_files=files)


def _fit(pipe: Pipeline, x: np.ndarray, y: np.ndarray) -> tuple[Pipeline, float]:
    start = time.perf_counter()
    pipe.fit(x, y)
    return pipe, time.perf_counter() - start
