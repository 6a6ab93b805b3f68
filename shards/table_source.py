"""A CSV/TSV table (an EcoTaxa export, say) into items: one row, one input.

Each row ends as exactly one of: a labelled item (a category and, with a status column, a status in
`source.keep_status`), an item of the unlabelled set (`source.unlabelled`), an excluded row (not
written, counted), or a `Reject` naming its line. An EcoTaxa type row is skipped: it is no input.
Faults of the table itself (an unknown status, a duplicate id, a half type row) are `ConfigError`s:
read on, they would drop or mislabel rows without a word.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from shards.classes import class_name_problem, load_class_map, read_class_list, shown
from shards.config import CsvSource
from shards.ecotaxa import is_type_row, kept_statuses, row_status, status_column
from shards.items import UNLABELLED, Collection, Item, Reject, dedupe
from shards.keys import WHOLE, Part, key_from_id, key_from_path
from shards.tables import Table, read_table
from trainer.runtime.exits import ConfigError

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
Record = tuple[int, dict[str, str]]  # (line, cells by column name)


@dataclass(frozen=True)
class _Context:
    cfg: CsvSource
    table: Path
    status_column: str | None
    keep: set[str]
    pinned: list[str] | None
    mapping: dict[str, str]  # fine -> coarse


@dataclass(frozen=True)
class _Row:
    """A row that will be an item, once the class list is known."""

    rel: str
    label: str               # the category as written; "" for the unlabelled set
    split: str | None
    status: str
    source_id: str
    features: tuple[float, ...]


def from_csv(cfg: CsvSource, part: Part = WHOLE) -> Collection:
    """The table's rows as a collection; with `part` (an array task of a partitioned build), the rows of
    that share only, read in one streamed pass, while the class list stays the whole table's."""
    table = read_table(Path(cfg.path).expanduser(), cfg.delimiter, "source.path", stream=part.count > 1)
    _check_columns(cfg, table)
    status_col = status_column(cfg.status_column, table.header, table.path)
    pinned = read_class_list(cfg.classes) if cfg.classes else None
    ctx = _Context(cfg, table.path, status_col, kept_statuses(cfg.keep_status), pinned, {})
    if part.count == 1:
        records = list(_records(table))
        named, labels = {_label(cfg, rec) for _, rec in records} - {""}, None
    else:
        records, named, labels = _share(ctx, _records(table), part)
    if cfg.key_column:
        _check_ids(records, cfg.key_column, table.path)
    ctx = replace(ctx, mapping=load_class_map(cfg.class_map, named, pinned))
    classes = None if labels is None else pinned or sorted({ctx.mapping.get(s, s) for s in labels})
    return _collection(ctx, records, classes)


def _share(ctx: _Context, records: Iterator[Record], part: Part) -> tuple[list[Record], set[str], set[str]]:
    """(the rows `part` takes, every label the table names, the labels of every row that becomes a
    labelled item): the class list is the whole table's, so that every task numbers classes alike.
    Rows go to tasks by sample key, so the rows of one id meet in one task's duplicate check."""
    mine, named, labels = [], set(), set()
    for line, rec in records:
        label = _label(ctx.cfg, rec)
        if label:
            named.add(label)
        if part.takes(_partition_key(ctx.cfg, rec, f"{ctx.table}:{line}")):
            mine.append((line, rec))
        if ctx.pinned is None and label not in labels:
            # without a pinned list, whether a row becomes an item never depends on the class map
            status = row_status(rec, ctx.status_column, f"{ctx.table}:{line}")
            labelled = _is_labelled(ctx, status, label)
            if labelled and isinstance(_row(ctx, rec, line, label, status, labelled), _Row):
                labels.add(label)
    return mine, named, labels


def _partition_key(cfg: CsvSource, rec: dict[str, str], where: str) -> str:
    """The row's sample key (the item's own, see `_item`), or its place for a row that has none."""
    source_id = (rec.get(cfg.key_column) or "").strip() if cfg.key_column else ""
    rel = (rec.get(cfg.path_column) or "").strip()
    if cfg.key_column:
        return key_from_id(source_id) if source_id else where
    return key_from_path(rel) if rel else where


def _check_columns(cfg: CsvSource, table: Table) -> None:
    wanted = [("source.path_column", cfg.path_column), ("source.label_column", cfg.label_column)]
    wanted += [("source.split_column", cfg.split_column), ("source.key_column", cfg.key_column)]
    wanted += [("source.feature_columns", c) for c in cfg.feature_columns]
    for key, col in wanted:
        if col is not None and col not in table.header:
            raise ConfigError(f"{key}: column {col!r} not in {table.path} (columns: {table.header})")


def _records(table: Table) -> Iterator[Record]:
    """Every data row by column name; an EcoTaxa type row (only ever the first) is left out."""
    for i, (line, cells) in enumerate(table.rows):
        if i == 0 and is_type_row(table.header, cells, f"{table.path}:{line}"):
            continue
        yield line, table.record(cells)


def _check_ids(records: list[Record], column: str, table: Path) -> None:
    """Ids name the samples and key the predictions: two rows of one id are a broken export."""
    first: dict[str, tuple[str, int]] = {}
    for line, rec in records:
        raw = (rec.get(column) or "").strip()
        if not raw:
            continue  # quarantined with its row
        key = key_from_id(raw)
        if key in first:
            raw0, line0 = first[key]
            what = f"id {raw!r}" if raw == raw0 else f"ids {raw0!r} and {raw!r} (both sample key {key!r})"
            raise ConfigError(f"source.key_column: {table}: {what} on lines {line0} and {line} "
                              f"(column {column!r}): ids must be unique")
        first[key] = (raw, line)


def _label(cfg: CsvSource, rec: dict[str, str]) -> str:
    return (rec.get(cfg.label_column) or "").strip() if cfg.label_column else ""


def _collection(ctx: _Context, records: list[Record], classes: list[str] | None = None) -> Collection:
    """The items of `records`; `classes`: the class list when it was taken from more rows than these."""
    labelled, unlabelled, rejects, excluded = [], [], [], Counter()
    for line, rec in records:
        status = row_status(rec, ctx.status_column, f"{ctx.table}:{line}")
        label = _label(ctx.cfg, rec)
        if _is_labelled(ctx, status, label):
            row = _row(ctx, rec, line, label, status, labelled=True)
            (rejects if isinstance(row, Reject) else labelled).append(row)
        elif ctx.cfg.unlabelled:
            row = _row(ctx, rec, line, "", status, labelled=False)
            (rejects if isinstance(row, Reject) else unlabelled).append(row)
        else:
            excluded[(status, shown(label))] += 1
    if classes is None:
        classes = ctx.pinned or sorted({ctx.mapping.get(r.label, r.label) for r in labelled})
    index = {c: i for i, c in enumerate(classes)}
    items = [_item(ctx, r, index[ctx.mapping.get(r.label, r.label)]) for r in labelled]
    counts = Counter(it.label for it in items)
    # a table without labels expects none: its pinned classes are what a model will predict
    empty = [c for i, c in enumerate(classes) if not counts[i]] if ctx.cfg.label_column else []
    items += [_item(ctx, r, UNLABELLED) for r in unlabelled]
    return Collection(classes, dedupe(items, rejects, classes), rejects, empty, list(ctx.cfg.feature_columns),
                      excluded, ctx.mapping, ctx.cfg.unlabelled)


def _is_labelled(ctx: _Context, status: str, label: str) -> bool:
    if ctx.cfg.label_column is None:
        return False
    if ctx.status_column is None:
        return True  # every row is meant to be labelled: a missing label is a fault, quarantined
    return status in ctx.keep and label != ""


def _row(ctx: _Context, rec: dict[str, str], line: int, label: str, status: str,
         labelled: bool) -> _Row | Reject:
    cfg = ctx.cfg
    rel = (rec.get(cfg.path_column) or "").strip()
    split = cfg.unlabelled
    if labelled:
        split = None
        if cfg.split_column:
            raw = (rec.get(cfg.split_column) or "").strip().lower()
            split = SPLIT_ALIASES.get(raw)
            if split is None:
                return Reject(f"{ctx.table}:{line}", "", shown(label), f"split {raw!r} is not train/val/test",
                              status)
    source_id = (rec.get(cfg.key_column) or "").strip() if cfg.key_column else ""
    features, feature_problem = _features(rec, cfg.feature_columns)
    problem = (_path_problem(rel, source_id, cfg) or (_label_problem(label, ctx) if labelled else "")
               or feature_problem)
    if problem:
        return Reject(shown(rel) or f"{ctx.table}:{line}", split or "", shown(label),
                      f"{problem} ({ctx.table.name}:{line})", status)
    return _Row(rel, label, split, status, source_id, features)


def _path_problem(rel: str, source_id: str, cfg: CsvSource) -> str:
    if not rel:
        return f"missing path (column {cfg.path_column!r})"
    if cfg.key_column and not source_id:
        return f"missing id (column {cfg.key_column!r})"
    return ""


def _label_problem(label: str, ctx: _Context) -> str:
    if not label:
        return f"missing label (column {ctx.cfg.label_column!r})"
    if class_name_problem(label):
        return class_name_problem(label)
    if ctx.pinned is not None and ctx.mapping.get(label, label) not in ctx.pinned:
        return f"label {label!r} not in the class list {ctx.cfg.classes}"
    return ""


def _item(ctx: _Context, row: _Row, label: int) -> Item:
    cfg = ctx.cfg
    key = key_from_id(row.source_id) if cfg.key_column else key_from_path(row.rel)
    root = Path(cfg.root).expanduser() if cfg.root else ctx.table.parent
    coarse = ctx.mapping.get(row.label, row.label)
    return Item(key, str(root / row.rel), row.rel, label, row.split, row.features, row.status, row.source_id,
                row.label if coarse != row.label else "")


def _features(row: dict, columns: list[str]) -> tuple[tuple[float, ...], str]:
    values = []
    for col in columns:
        raw = (row.get(col) or "").strip()
        # EcoTaxa leaves unmeasured features empty (or NaN, from pandas): stored as null
        if raw == "" or raw.lower() == "nan":
            values.append(math.nan)
            continue
        try:
            value = float(raw)
        except ValueError:
            return (), f"feature {col!r} is not a number: {raw!r}"
        if not math.isfinite(value):
            return (), f"feature {col!r} is not finite: {raw!r}"
        values.append(value)
    return tuple(values), ""
