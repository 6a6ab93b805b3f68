"""`taxotrain-head`: a classical classifier on a bag's exported features, judged as the bag is.

Reads the features folder (`table.py`), fits the head with the chosen engine (`sklearn_engine.py` or
`spark_engine.py`, one contract: `engine.py`), fits acceptance thresholds on the validation split (the
same rule as `taxotrain-calibrate`), writes the report (`report.py`), `head.json` (what
`taxotrain-predict head=DIR` needs: the classes, the inputs, the members whose embeddings feed it, the
thresholds and the model file), optionally the learning curve (`curve.py`), and last rewrites
`compare.md` beside the heads (`compare.py`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from trainer.heads import compare, curve, report, sklearn_engine, table, wandb_head
from trainer.heads.config import HeadRunConfig
from trainer.heads.engine import Fitted
from trainer.inference.calibration import Thresholds, fit_thresholds
from trainer.runtime import distributed, lock, logfile
from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_write

log = logging.getLogger(__name__)
HEAD_FILE = "head.json"


def fit(cfg: HeadRunConfig, data: table.FeatureSet, out: Path) -> Fitted:
    if cfg.engine == "spark":
        from trainer.heads import spark_engine  # pyspark and a JVM only when asked for

        return spark_engine.fit(cfg, data, out)
    return sklearn_engine.fit(cfg, data, out)


def check_bag(cfg: HeadRunConfig, data: table.FeatureSet) -> Path:
    """The bag compared with: the one the features came from (another one is refused)."""
    recorded = Path(data.bag)
    if cfg.bag is not None and Path(cfg.bag).resolve() != recorded.resolve():
        raise ConfigError(f"bag: the features in {cfg.features} were exported from {recorded}, not "
                          f"{Path(cfg.bag).resolve()}: export this bag's features first")
    return Path(cfg.bag_report) if cfg.bag_report else recorded / "report.json"


def thresholds(cfg: HeadRunConfig, fitted: Fitted, labels: np.ndarray, classes: int) -> Thresholds:
    probs = fitted.probs[cfg.val_split][labels >= 0]
    return fit_thresholds(probs.max(1), probs.argmax(1), labels[labels >= 0], classes, cfg.target_precision,
                          cfg.min_samples)


def description(cfg: HeadRunConfig, data: table.FeatureSet) -> dict:
    record = data.record
    return {"kind": str(cfg.head.kind), "scheme": str(cfg.head.scheme), "inputs": str(cfg.inputs),
            "pca": cfg.pca, "class_weight": str(cfg.head.class_weight),
            "features": str(data.root.resolve()), "bag": str(Path(data.bag).resolve()),
            "members": [m["name"] for m in record["members"]], "checkpoint": record.get("checkpoint"),
            "tta": record.get("tta"), "mode": record.get("mode"), "features_pca": record.get("pca"),
            "native_names": data.native_names, "deep": data.deep}


def head(cfg: HeadRunConfig) -> dict:
    splits = (cfg.train_split, cfg.val_split, cfg.test_split)
    data = table.load(Path(cfg.features), list(splits), labelled=splits)
    bag_report = check_bag(cfg, data)
    if cfg.inputs == "native" and not data.native_names:
        raise ConfigError(f"inputs: native, but {cfg.features} has no native features (the shards recorded "
                          f"none); use inputs=deep")
    out = cfg.out_dir()
    fitted = fit(cfg, data, out)
    labels = {s: data.splits[s].labels for s in splits}
    accept = thresholds(cfg, fitted, labels[cfg.val_split], len(data.classes))
    described = description(cfg, data)
    result = report.build(cfg.name(), fitted, described, data.classes, labels, splits, accept,
                          list(cfg.frequency_bins))
    files = report.write(result, out)
    atomic_write(out / HEAD_FILE, json.dumps({**described, "engine": fitted.engine, "classes": data.classes,
                                              "params": fitted.params, "model_files": fitted.model_files,
                                              "thresholds": accept.to_dict()}, indent=1) + "\n")
    if cfg.curve:
        curve.run(cfg, data, fitted.params, out)
    wandb_head.log_head(cfg, result, files, out, described)  # a run in the bag's group, job_type=head
    table_path = compare.write(out.parent, bag_report, list(cfg.frequency_bins))
    logfile.echo(report.markdown(result) + "\nwritten: " + ", ".join(str(p) for p in files.values()) +
          f", {out / HEAD_FILE}\n\n" + table_path.read_text() + f"\n(compare table: {table_path})")
    return result


def run(cfg: HeadRunConfig) -> int:
    env = distributed.detect()
    if env.world_size > 1:
        raise ConfigError("taxotrain-head runs as one process (engine=spark spreads the work); "
                          "start it without torchrun/srun tasks")
    with lock.writing(cfg.out_dir(), "head", env):
        logfile.attach(cfg.out_dir(), "head", True)
        head(cfg)
    return 0
