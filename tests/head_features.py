"""A features folder as `launch.features` writes it, made from scikit-learn's 1,797 real digits, for the
tests of the classical heads: the 64 pixel intensities stand in for a member's embedding and three
"native" measurements (ink, height, width of the stroke) for the instrument's, some of them missing.

Written through `trainer/inference/features.py`'s own writers, so the files are the real format.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from trainer.inference.features import Rows, npz_arrays, write_parquet

NATIVE = ["ink", "height", "width"]
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


def native_measures(images: np.ndarray) -> np.ndarray:
    ink = images.reshape(len(images), -1).sum(1)
    rows = (images > 4).any(2)
    cols = (images > 4).any(1)
    return np.stack([ink, rows.sum(1), cols.sum(1)], axis=1).astype(np.float32)


def make_features(root: Path, fmt: str = "npz", missing: float = 0.05, seed: int = 0,
                  bag: str = "/bags/digits", classes: int = 10, member: str = "member-00") -> Path:
    """`root/features.json` + `features-<split>.<fmt>` for train/val/test; returns `root`."""
    digits = load_digits(n_class=classes)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    native = native_measures(digits.images)
    native[rng.random(native.shape) < missing] = np.nan
    emb = (digits.data + rng.normal(0, 0.5, digits.data.shape)).astype(np.float32)
    names = [str(c) for c in range(classes)]
    root.mkdir(parents=True, exist_ok=True)
    record = {"format": fmt, "mode": "per_member", "tta": "none", "checkpoint": "best", "bag": bag,
              "shards": "/shards/digits", "members": [{"name": member, "model": "digits", "step": 0,
                                                       "dim": emb.shape[1]}],
              "classes": names, "native_names": NATIVE, "dims": {member: emb.shape[1]}, "splits": {},
              "pca": None}
    start = 0
    for split, share in SPLITS.items():
        stop = len(order) if split == "test" else start + int(share * len(order))
        idx = np.sort(order[start:stop])
        start = stop
        keys = np.array([f"d{i:05d}" for i in idx], dtype=str)
        probs = np.full((len(idx), classes), 1.0 / classes, np.float32)
        rows = Rows(keys, digits.target[idx].astype(np.int64), np.array([f"{k}.png" for k in keys]),
                    native[idx], {member: emb[idx]}, probs)
        path = root / f"features-{split}.{fmt}"
        if fmt == "npz":
            np.savez(path, **npz_arrays(rows, names, NATIVE))
        else:
            write_parquet(path, rows, names, NATIVE)
        record["splits"][split] = {"file": path.name, "samples": len(idx), "exported": len(idx), "bad": 0,
                                   "bad_samples": []}
    (root / "features.json").write_text(json.dumps(record, indent=1) + "\n")
    return root
