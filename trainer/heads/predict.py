"""`taxotrain-predict head=DIR`: the EcoTaxa 2.8 pipeline end to end, a classical head on the bag's
embeddings of new images.

Each batch goes through the bag's members exactly as `taxotrain-features` exported it (the same members,
checkpoint and TTA, read from the head's `head.json`): the penultimate embeddings side by side, the native
measurements of each sample's `.json` (NaN where missing, imputed by the head as in training), then the
head's pipeline. Rows, decisions and files are `taxotrain-predict`'s (`trainer/inference/predict.py`);
`auto` uses the thresholds the head fitted on validation.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainer.data import streams as data
from trainer.heads import model_file
from trainer.heads.engine import full_probs
from trainer.heads.run import HEAD_FILE
from trainer.inference import predict as bag_predict
from trainer.inference.calibration import Thresholds
from trainer.inference.config import PredictConfig
from trainer.inference.features import native_row
from trainer.inference.members import Member, embeddings
from trainer.runtime.exits import ConfigError

log = logging.getLogger(__name__)


def read_head(head: Path) -> dict:
    record = json.loads((head / HEAD_FILE).read_text())
    if record.get("engine") != "sklearn":
        raise ConfigError(f"head: {head} was fitted with engine={record.get('engine')}; predict runs "
                          f"scikit-learn heads only (refit it with engine=sklearn)")
    if record.get("features_pca"):
        raise ConfigError(f"head: {head} was fitted on features exported with pca=; export them without "
                          f"it (the head fits its own PCA: head pca=N) to predict with the head")
    return record


def check(cfg: PredictConfig, record: dict, head: Path) -> None:
    if Path(cfg.bag).resolve() != Path(record["bag"]):
        raise ConfigError(f"head: {head} was fitted on features of the bag {record['bag']}, not "
                          f"{Path(cfg.bag).resolve()}")
    if record["inputs"] != "deep" and not cfg.is_shards:
        raise ConfigError(f"head: {head} uses native measurements ({record['inputs']}), which a folder of "
                          f"images does not carry; predict shards (input=SHARDS split=...) or use a head "
                          f"with inputs=deep")


def scoring(head: Path, record: dict) -> bag_predict.ScoringFactory:
    def factory(cfg: PredictConfig, members: list[Member]) -> bag_predict.Scoring:
        if members[0].classes != record["classes"]:
            raise ConfigError(f"head: {head} knows other classes than the bag {cfg.bag}")
        pipe = model_file.load(head / record["model_files"][0])
        known = [int(c) for c in pipe.classes_]
        device = next(members[0].net.parameters()).device
        inputs, names, tta = record["inputs"], record["native_names"], record["tta"]

        def probabilities(batch: data.Batch) -> Tensor:
            parts = []
            if inputs != "deep":
                parts.append(np.array([native_row(m, names) for m in batch.meta], np.float64)
                             .reshape(len(batch.keys), len(names)))
            if inputs != "native":
                images = batch.images.to(device)
                parts += [embeddings(m, images, tta)[0].cpu().numpy().astype(np.float64) for m in members]
            probs = pipe.predict_proba(np.concatenate(parts, axis=1))
            return torch.from_numpy(full_probs(probs, known, len(record["classes"])))

        accept = Thresholds.from_dict(record["thresholds"])
        return bag_predict.Scoring(record["classes"], probabilities, accept)

    return factory


def run(cfg: PredictConfig) -> int:
    if cfg.head is None:
        return bag_predict.run(cfg)
    head = Path(cfg.head)
    record = read_head(head)
    check(cfg, record, head)
    # the members, checkpoint and views the head's features were exported with: other embeddings would
    # be other inputs than the ones it learnt from
    same = replace(cfg, members=list(record["members"]), checkpoint=record["checkpoint"], tta=record["tta"])
    log.info("head %s on the embeddings of %s (checkpoint %s, tta %s)", head, ", ".join(record["members"]),
             record["checkpoint"], record["tta"])
    return bag_predict.run(same, scoring(head, record))


