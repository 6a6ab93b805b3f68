"""Enumerate a collection (class folders, a CSV/TSV manifest, the demo digits) into items.

Nothing is opened here beyond directory listings and the table: image checks happen in the
writer processes. Every row or file that cannot become an item is returned as a `Reject`.
"""
from __future__ import annotations

import csv
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from shards.config import CsvSource, DemoSource, ImageFolderSource, SourceConfig
from shards.keys import key_from_id, key_from_path
from trainer.runtime.exits import ConfigError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# ignored everywhere: version control, notebooks, macOS and Windows litter
_IGNORED_FILES = {"Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Item:
    key: str
    path: str          # absolute path read by the writer
    rel: str           # path as the collection names it; stored in the sample
    label: int
    split: str | None
    features: tuple[float, ...] = ()


@dataclass(frozen=True)
class Reject:
    origin: str        # the path as the collection names it, or "table:line" without one
    split: str         # "" when not known
    cls: str           # "" when not known
    reason: str


@dataclass
class Collection:
    classes: list[str]
    items: list[Item]
    rejects: list[Reject] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_FILES


def class_name_problem(name: str) -> str:
    """Why `name` cannot be a class ("" when it can). classes.txt holds one name per line: a newline
    (or CR, tab, any control or line-separator character) would split or blur a name there, and a
    build pinned to that file would shift every later class index without an error."""
    odd = "".join(sorted({ch for ch in name if unicodedata.category(ch) in ("Cc", "Zl", "Zp")}))
    if not odd:
        return ""
    return f"class name {name!r} contains control characters {odd!r}; rename it"


def _shown(text: str) -> str:
    """`text` on one line for the reports: escaped (as Python writes it) only where it has to be."""
    return repr(text)[1:-1] if class_name_problem(text) else text


def read_class_list(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"source.classes: cannot read {path}: {e}") from e
    names = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    odd = [n for n in names if class_name_problem(n)]
    if odd:
        raise ConfigError(f"source.classes: {path}: {class_name_problem(odd[0])}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"source.classes: {path} lists {dupes} more than once")
    if not names:
        raise ConfigError(f"source.classes: {path} lists no class")
    return names


def _dedupe(items: list[Item], rejects: list[Reject], classes: list[str]) -> list[Item]:
    seen: dict[str, Item] = {}
    kept = []
    for it in items:
        if it.key in seen:
            rejects.append(Reject(it.rel, it.split or "", classes[it.label],
                                  f"duplicate key {it.key!r} (first: {seen[it.key].rel})"))
            continue
        seen[it.key] = it
        kept.append(it)
    return kept


def from_imagefolder(cfg: ImageFolderSource) -> Collection:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"source.root: {root} is not a directory")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name))
    # each file of a folder whose name cannot be a class is an input of its own, quarantined
    odd = [d for d in found if class_name_problem(d)]
    found = [d for d in found if d not in odd]
    # not is_dir(): a dangling symlink is a lost input too, and must be reported
    stray = sorted(f.name for f in root.iterdir() if not f.is_dir() and not _hidden(f.name))
    classes = read_class_list(cfg.classes) if cfg.classes else found
    rejects = [Reject(f, "", "", "file outside any class folder") for f in stray]
    rejects += [Reject(_shown(f.relative_to(root).as_posix()), "", _shown(d), class_name_problem(d))
                for d in odd for f in walk(root / d)]
    # each file of an unlisted class folder is an input of its own, so each is reported
    rejects += [Reject(f.relative_to(root).as_posix(), "", d, f"class {d!r} not in {cfg.classes}")
                for d in found if d not in classes for f in walk(root / d)]
    items: list[Item] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = walk(root / name) if (root / name).is_dir() else []
        if not files:
            empty.append(name)
        for f in files:
            rel = f.relative_to(root).as_posix()
            items.append(Item(key_from_path(rel), str(f), rel, label, None))
    return Collection(classes, _dedupe(items, rejects, classes), rejects, empty)


def walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        out += [Path(dirpath) / f for f in sorted(filenames) if not _hidden(f)]
    return out


def _delimiter(path: Path, first_line: str, given: str | None) -> str:
    if given:
        return "\t" if given in ("\\t", "tab") else given
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    counts = {d: first_line.count(d) for d in ("\t", ",", ";")}
    return max(counts, key=counts.get)


def from_csv(cfg: CsvSource) -> Collection:
    table = Path(cfg.path).expanduser()
    if not table.is_file():
        raise ConfigError(f"source.path: {table} is not a file")
    root = Path(cfg.root).expanduser() if cfg.root else table.parent
    with table.open(newline="", encoding="utf-8-sig") as fh:
        first = fh.readline()
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter=_delimiter(table, first, cfg.delimiter))
        header = reader.fieldnames or []
        wanted = [("source.path_column", cfg.path_column), ("source.label_column", cfg.label_column)]
        wanted += [("source.split_column", cfg.split_column), ("source.key_column", cfg.key_column)]
        wanted += [("source.feature_columns", c) for c in cfg.feature_columns]
        for key, col in wanted:
            if col is not None and col not in header:
                raise ConfigError(f"{key}: column {col!r} not in {table} (columns: {header})")
        rows = [(reader.line_num, row) for row in reader]
    pinned = read_class_list(cfg.classes) if cfg.classes else None
    return _rows_to_collection(cfg, table, root, rows, pinned)


def _rows_to_collection(cfg: CsvSource, table: Path, root: Path, rows: list, pinned) -> Collection:
    rejects: list[Reject] = []
    parsed = []
    for line, row in rows:
        origin = f"{table}:{line}"
        rel = (row.get(cfg.path_column) or "").strip()
        label = (row.get(cfg.label_column) or "").strip()
        split = ""
        if cfg.split_column:
            raw = (row.get(cfg.split_column) or "").strip().lower()
            split = SPLIT_ALIASES.get(raw, "")
            if not split:
                rejects.append(Reject(origin, "", _shown(label), f"split {raw!r} is not train/val/test"))
                continue
        problem = _row_problem(rel, label, pinned, cfg)
        features, feat_problem = _features(row, cfg.feature_columns)
        problem = problem or feat_problem
        if problem:
            rejects.append(Reject(_shown(rel) or origin, split, _shown(label),
                                  f"{problem} ({table.name}:{line})"))
            continue
        parsed.append((rel, label, split or None, features, row))
    classes = pinned or sorted({p[1] for p in parsed})
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for rel, label, split, features, row in parsed:
        key = key_from_id(row[cfg.key_column]) if cfg.key_column else key_from_path(rel)
        items.append(Item(key, str(root / rel), rel, index[label], split, features))
    counts = {c: 0 for c in classes}
    for it in items:
        counts[classes[it.label]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    return Collection(classes, _dedupe(items, rejects, classes), rejects, empty,
                      list(cfg.feature_columns))


def _row_problem(rel: str, label: str, pinned: list[str] | None, cfg: CsvSource) -> str:
    if not rel:
        return f"missing path (column {cfg.path_column!r})"
    if not label:
        return f"missing label (column {cfg.label_column!r})"
    if class_name_problem(label):
        return class_name_problem(label)
    if pinned is not None and label not in pinned:
        return f"label {label!r} not in the class list {cfg.classes}"
    return ""


def _features(row: dict, columns: list[str]) -> tuple[tuple[float, ...], str]:
    values = []
    for col in columns:
        raw = (row.get(col) or "").strip()
        if raw == "":
            values.append(math.nan)  # EcoTaxa leaves unmeasured features empty
            continue
        try:
            value = float(raw)
        except ValueError:
            return (), f"feature {col!r} is not a number: {raw!r}"
        if not math.isfinite(value):
            return (), f"feature {col!r} is not finite: {raw!r}"
        values.append(value)
    return tuple(values), ""


def from_demo(cfg: DemoSource) -> Collection:
    from shards.demo import write_demo_digits

    root = write_demo_digits(Path(cfg.root).expanduser())
    return from_imagefolder(ImageFolderSource(root=str(root), classes=cfg.classes))


def collect(cfg: SourceConfig) -> Collection:
    readers = {"imagefolder": from_imagefolder, "csv": from_csv, "demo": from_demo}
    if cfg.kind not in readers:
        raise ConfigError(f"source.kind: unknown source {cfg.kind!r} (imagefolder | csv | demo)")
    return readers[cfg.kind](cfg)
