"""The features that `launch.features` exported, read for a head: labels, keys and the input matrix.

One `FeatureSet` per features folder: `features.json` says the classes, the native feature names, the
members' embedding arrays and their widths, and the file of every split (npz or parquet). Everything a
head relies on is checked here, once, with the file named: the same columns in every split, labels
where a head needs them, finite embeddings. Native values may be missing (NaN): the head imputes them
from the training split. Nothing is unpickled (`allow_pickle=False`; parquet is plain data).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.heads.config import Inputs
from trainer.runtime.exits import ConfigError

CONCAT = "ensemble"  # the array of `mode=concat` exports (trainer/inference/features.py)


@dataclass
class Split:
    name: str
    path: Path
    keys: np.ndarray      # str [N], sorted (features.py writes rows by key)
    labels: np.ndarray    # int64 [N]; -1 in an unlabelled set

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class FeatureSet:
    root: Path
    record: dict                   # features.json
    classes: list[str]
    native_names: list[str]
    deep: dict[str, int]           # embedding array -> width, in the export's order
    splits: dict[str, Split]

    @property
    def format(self) -> str:
        return str(self.record["format"])

    @property
    def bag(self) -> str:
        return str(self.record["bag"])

    def parquet_columns(self, inputs: Inputs) -> tuple[list[str], list[str]]:
        """(native, deep) column names of the parquet files, as the Spark engine reads them."""
        native = [f"native.{n}" for n in self.native_names] if inputs != Inputs.deep else []
        deep = ([f"{'emb' if name == CONCAT else name}.{j}" for name, width in self.deep.items()
                 for j in range(width)] if inputs != Inputs.native else [])
        return native, deep

    def matrix(self, split: str, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        """(native [N, F] with NaN where missing, deep [N, D]) of one split, float64; either may be
        zero-wide when `inputs` leaves it out."""
        entry = self.splits[split]
        native, deep = _read_arrays(entry.path, self.format, self.native_names, self.deep)
        if inputs == Inputs.deep:
            native = native[:, :0]
        if inputs == Inputs.native:
            deep = deep[:, :0]
        _check_finite(entry.path, native, deep)
        return native, deep


def load(root: Path, splits: list[str], labelled: tuple[str, ...] = ()) -> FeatureSet:
    """The features folder `root` with `splits` read (keys, labels) and checked; the splits named in
    `labelled` must carry labels (a head trains and is judged on labelled splits only)."""
    record = _record(root)
    names = list(record["native_names"])
    deep = {str(k): int(v) for k, v in record["dims"].items()}
    found = {}
    for name in splits:
        entry = record["splits"].get(name)
        if entry is None:
            raise ConfigError(f"features: {root} has no split {name!r} (it has {sorted(record['splits'])}); "
                              f"export it with taxotrain-features data.splits=[...]")
        if "file" not in entry:  # taxotrain-features parts=true: a folder of part files per split
            raise ConfigError(f"features: split {name!r} of {root} was exported in parts (parts=true); a "
                              f"head reads one file per split: export again without parts")
        path = root / entry["file"]
        keys, labels = _read_labels(path, record["format"], list(record["classes"]), names, deep)
        if name in labelled and not (labels >= 0).any():
            raise ConfigError(f"features: split {name!r} ({path}) has no labels (an unlabelled set); "
                              f"a head trains and is judged on labelled splits")
        found[name] = Split(name, path, keys, labels)
    return FeatureSet(root, record, list(record["classes"]), names, deep, found)


def _record(root: Path) -> dict:
    path = root / "features.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"features: cannot read {path}: {err}") from None
    missing = {"format", "classes", "native_names", "dims", "splits", "bag"} - set(record)
    if missing:
        raise ConfigError(f"features: {path} lacks {sorted(missing)}: not written by taxotrain-features")
    if not record["dims"]:
        raise ConfigError(f"features: {path} records no embeddings (an export that wrote no split)")
    return record


def _read_labels(path: Path, fmt: str, classes: list[str], names: list[str], deep: dict[str, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Keys and labels of one file, after checking that its columns are the ones features.json lists."""
    if not path.is_file():
        raise ConfigError(f"features: {path} is missing (listed in features.json)")
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            _same(path, "native columns", list(z["native_names"]), names)
            _same(path, "classes", list(z["classes"]), classes)
            widths = {k.removeprefix("emb/"): z[k].shape[1] for k in z.files if k.startswith("emb/")}
            _same(path, "embedding arrays", widths, deep)
            return z["keys"].astype(str), z["labels"].astype(np.int64)
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    found = [c.removeprefix("native.") for c in schema.names if c.startswith("native.")]
    _same(path, "native columns", found, names)
    expected = {f"{'emb' if n == CONCAT else n}.{j}" for n, w in deep.items() for j in range(w)}
    missing = sorted(expected - set(schema.names))
    if missing:
        raise ConfigError(f"features: {path} lacks embedding columns {missing[:5]} (of {len(missing)}): "
                          f"not the columns features.json lists")
    table = pq.read_table(path, columns=["key", "label"])
    return (np.asarray(table.column("key").to_pylist(), dtype=str),
            table.column("label").to_numpy().astype(np.int64))


def _same(path: Path, what: str, found: object, expected: object) -> None:
    if found != expected:
        raise ConfigError(f"features: {path} has {what} {found}, but features.json lists {expected}: the "
                          f"splits differ (exported by different runs?)")


def _read_arrays(path: Path, fmt: str, names: list[str], deep: dict[str, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            native = z["native"].astype(np.float64).reshape(len(z["keys"]), len(names))
            parts = [z[f"emb/{n}"].astype(np.float64) for n in deep]
    else:
        import pyarrow.parquet as pq

        native_cols = [f"native.{n}" for n in names]
        deep_cols = [f"{'emb' if n == CONCAT else n}.{j}" for n, w in deep.items() for j in range(w)]
        table = pq.read_table(path, columns=native_cols + deep_cols)
        columns = [table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                   for c in table.column_names]
        rows = table.num_rows
        native = np.stack(columns[:len(names)], axis=1) if names else np.zeros((rows, 0))
        parts = [np.stack(columns[len(names):], axis=1)] if deep_cols else []
    deep_matrix = np.concatenate(parts, axis=1) if parts else np.zeros((len(native), 0))
    return native, deep_matrix


def _check_finite(path: Path, native: np.ndarray, deep: np.ndarray) -> None:
    bad_deep = int((~np.isfinite(deep)).any(axis=1).sum())
    if bad_deep:
        raise ConfigError(f"features: {path} has {bad_deep} rows with non-finite embeddings (NaN/inf): a "
                          f"diverged member? re-export from a healthy checkpoint")
    infinite = int(np.isinf(native).any(axis=1).sum())
    if infinite:
        raise ConfigError(f"features: {path} has {infinite} rows with infinite native values (missing ones "
                          f"are NaN and imputed; inf is not a measurement)")
