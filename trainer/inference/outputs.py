"""The predictions file in one of four formats, and the reader that gives it back as dicts.

`tsv` / `csv`: today's table (`key, path` for shards, else `path`; `class_i, prob_i` for i in 1..k, best
first) with `object_id` first when any row has one and `decision` (auto/review) last; probabilities with
6 decimals. `parquet`: the same columns, prob_i as float64. `ecotaxa`: a TSV for EcoTaxa's import in
update mode ("update data including classification"), which matches objects already in the project by
`object_id`: header, type row (`[t]` text, `[f]` number), then object_id, the top-1 class as a
`predicted` annotation, its probability and the decision in two free `object_taxotrain_*` columns.
Why these columns: the comments on the constants below, each naming the ecotaxa/ecotaxa_back file it
was read from (commit cb44b190, v3.2.1-9). Every file is written atomically.
"""
from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_path, atomic_write

TSV, CSV, PARQUET, ECOTAXA = "tsv", "csv", "parquet", "ecotaxa"
FORMATS = (TSV, CSV, PARQUET, ECOTAXA)
DECISIONS = ("auto", "review")
_DEFAULT_NAMES = {TSV: "predictions.tsv", CSV: "predictions.csv", PARQUET: "predictions.parquet",
                  # EcoTaxa only picks up files named ecotaxa*.tsv / ecotaxa*.txt (BO/Bundle.py TSV_FILTERS)
                  ECOTAXA: "ecotaxa_predictions.tsv"}

# EcoTaxa has no TSV column for a prediction's score (BO/TSVFile.py gives every imported `predicted`
# object the pseudo score 1.0), so ours goes to a free numeric column: unknown `object_*` headers
# become free columns typed by the type row. Only the top-1 is written: a project has just 20 free
# text columns (DB/Object.py t01..t20), and the full top-k stays in the other formats.
ECOTAXA_COLUMNS = (("object_id", "[t]"), ("object_annotation_category", "[t]"),
                   ("object_annotation_status", "[t]"), ("object_taxotrain_score", "[f]"),
                   ("object_taxotrain_decision", "[t]"))
# EcoTaxa's status for a machine classification awaiting a person (DB/Object.py classif_qual_labels)
ECOTAXA_STATUS = "predicted"
# EcoTaxa reads a TSV as latin-1 unless it starts with a UTF-8 BOM: the BOM keeps "Noctiluca é" intact
BOM = "\ufeff"
_BREAKS = ("\t", "\n", "\r")


@dataclass(frozen=True)
class PredictionRow:
    key: str                   # the sample key (shards) or relative path (folder input)
    path: str                  # the image path as the collection named it
    object_id: str             # EcoTaxa object_id when the shard metadata has one ("id"), else ""
    classes: tuple[str, ...]   # top-k class names, best first
    probs: tuple[float, ...]   # their (calibrated) probabilities
    decision: str              # "auto" (above its class's threshold) or "review"

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.probs):
            raise ValueError(f"{self.key}: {len(self.classes)} classes but {len(self.probs)} probabilities")
        if self.decision not in DECISIONS:
            raise ValueError(f"{self.key}: decision {self.decision!r} is not one of {DECISIONS}")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"format: unknown value {fmt!r}; allowed: {', '.join(FORMATS)}")
    return fmt


def default_name(fmt: str) -> str:
    return _DEFAULT_NAMES[check_format(fmt)]


# ---------------------------------------------------------------- writing


def write_predictions(out: Path, fmt: str, rows: Sequence[PredictionRow], k: int, shards: bool) -> None:
    """`rows` (in the order given) to `out` as `fmt`; ConfigError before anything is written when the
    rows cannot be expressed in that format (ecotaxa: a missing or repeated object_id)."""
    check_format(fmt)
    for row in rows:
        if len(row.classes) != k:
            raise ValueError(f"{row.key}: {len(row.classes)} classes, expected k={k}")
    if fmt == ECOTAXA:
        atomic_write(out, ecotaxa_text(rows))
        return
    header = table_header(rows, k, shards)
    if fmt == PARQUET:
        write_parquet(out, header, [table_values(r, header) for r in rows])
        return
    lines = ([_cell(v) for v in table_values(r, header)] for r in rows)
    atomic_write(out, text_table(header, lines, "," if fmt == CSV else "\t"))


def table_header(rows: Sequence[PredictionRow], k: int, shards: bool) -> list[str]:
    # object_id only when the shards carried one: a folder run's table stays as it was
    header = ["object_id"] if any(r.object_id for r in rows) else []
    header += ["key", "path"] if shards else ["path"]
    header += [name for i in range(1, k + 1) for name in (f"class_{i}", f"prob_{i}")]
    return header + ["decision"]


def table_values(row: PredictionRow, header: list[str]) -> list[str | float]:
    ranked = [v for c, p in zip(row.classes, row.probs) for v in (c, float(p))]
    head = [getattr(row, name) for name in header[:len(header) - len(ranked) - 1]]  # object_id, key, path
    return [*head, *ranked, row.decision]


def text_table(header: list[str], lines: Iterable[list[str]], delimiter: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    return buf.getvalue()


def write_parquet(out: Path, header: list[str], values: list[list[str | float]]) -> None:
    import pyarrow as pa  # lazily, as features.py does: only this format needs it
    import pyarrow.parquet as pq

    types = [pa.float64() if name.startswith("prob_") else pa.string() for name in header]
    columns = [pa.array([v[j] for v in values], t) for j, t in enumerate(types)]
    table = pa.table(columns, schema=pa.schema(list(zip(header, types))))
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def ecotaxa_text(rows: Sequence[PredictionRow]) -> str:
    check_ecotaxa(rows)
    lines = ([r.object_id, r.classes[0], ECOTAXA_STATUS, f"{r.probs[0]:.6f}", r.decision] for r in rows)
    names, types = zip(*ECOTAXA_COLUMNS)
    # the type row goes through the writer like a data row: EcoTaxa reads it as the file's 2nd line
    return BOM + text_table(list(names), [list(types), *lines], "\t")


def check_ecotaxa(rows: Sequence[PredictionRow]) -> None:
    """What EcoTaxa's update import refuses or would misread, refused here with the row that has it."""
    missing = [r.key for r in rows if not r.object_id.strip()]
    if missing:
        raise ConfigError(f"format=ecotaxa: {len(missing)} of {len(rows)} rows have no EcoTaxa object_id "
                          f"(first: key {missing[0]!r}); build the shards with an object id column "
                          f"(source.key_column) or choose another format")
    ids = EcotaxaIds()
    for r in rows:
        ids.check(r.object_id, r.key, r.classes[0] if r.classes else None)


class EcotaxaIds:
    """The row-by-row part of `check_ecotaxa`; it keeps every object_id seen (one string per row) to
    catch a repeat, which is why merging into format=ecotaxa is for runs whose ids fit in memory."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def check(self, object_id: str, key: str, top_class: str | None) -> None:
        if not object_id.strip():
            raise ConfigError(f"format=ecotaxa: key {key!r} has no EcoTaxa object_id; build the shards "
                              f"with an object id column (source.key_column) or choose another format")
        if top_class is None:
            raise ConfigError(f"format=ecotaxa: key {key!r} has no class to annotate (k=0)")
        if object_id in self.seen:
            raise ConfigError(f"format=ecotaxa: object_id {object_id!r} appears twice (keys "
                              f"{self.seen[object_id]!r} and {key!r}); EcoTaxa updates one object per id")
        self.seen[object_id] = key
        for what, value in (("object_id", object_id), ("class name", top_class)):
            if any(c in value for c in _BREAKS):
                raise ConfigError(f"format=ecotaxa: {what} {value!r} (key {key!r}) contains a tab or "
                                  f"line break, which EcoTaxa's TSV cannot hold")


# ---------------------------------------------------------------- streaming (parts and their merge)


def part_header(k: int) -> list[str]:
    """The columns of every part file: object_id always ("" where the shards carry none), so that all
    parts of a run share one schema and read as one parquet dataset."""
    return ["object_id", "key", "path", *(f"{n}_{i}" for i in range(1, k + 1) for n in ("class", "prob")),
            "decision"]


def arrow_schema(header: list[str]):  # -> pyarrow.Schema; pyarrow is imported lazily
    import pyarrow as pa

    return pa.schema([(n, pa.float64() if n.startswith("prob_") else pa.string()) for n in header])


def rows_batch(rows: Sequence[PredictionRow], header: list[str]):  # -> pyarrow.RecordBatch
    import pyarrow as pa

    values = [table_values(r, header) for r in rows]
    schema = arrow_schema(header)
    return pa.record_batch([pa.array([v[j] for v in values], f.type) for j, f in enumerate(schema)],
                           schema=schema)


class TableWriter:
    """One predictions file written row batch by row batch through a temporary (`atomic_path`): the
    same bytes `write_predictions` writes for the same rows, without holding them. Rows are dicts keyed
    by `part_header`; `header` is the file's own columns. Use as a context manager: published on a clean
    exit, removed on an error."""

    def __init__(self, out: Path, fmt: str, header: list[str]) -> None:
        self.out, self.fmt, self.header = out, check_format(fmt), header
        self.ids = EcotaxaIds() if fmt == ECOTAXA else None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TableWriter:
        tmp = self._stack.enter_context(atomic_path(self.out))
        if self.fmt == PARQUET:
            import pyarrow.parquet as pq

            self._parquet = pq.ParquetWriter(tmp, arrow_schema(self.header))
            self._stack.callback(self._parquet.close)
            return self
        fh = self._stack.enter_context(open(tmp, "x", newline="", encoding="utf-8"))
        self._csv = csv.writer(fh, delimiter="," if self.fmt == CSV else "\t", lineterminator="\n")
        if self.fmt == ECOTAXA:
            fh.write(BOM)
            names, types = zip(*ECOTAXA_COLUMNS)
            self._csv.writerows([list(names), list(types)])
        else:
            self._csv.writerow(self.header)
        return self

    def write(self, rows: list[dict]) -> None:
        if self.fmt == PARQUET:
            import pyarrow as pa

            self._parquet.write_table(pa.Table.from_pylist(rows, arrow_schema(self.header)))
        elif self.ids is not None:
            for r in rows:
                self.ids.check(r["object_id"], r["key"], r.get("class_1"))
            self._csv.writerows([r["object_id"], r["class_1"], ECOTAXA_STATUS, f"{r['prob_1']:.6f}",
                                 r["decision"]] for r in rows)
        else:
            self._csv.writerows([_cell(r[n]) for n in self.header] for r in rows)

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)


def _cell(value: str | float) -> str:
    return f"{value:.6f}" if isinstance(value, float) else value


# ---------------------------------------------------------------- reading


def read_predictions(path: Path, fmt: str) -> list[dict]:
    """The rows of a predictions file as dicts keyed by its header, in file order; probabilities (and
    ecotaxa's `[f]` columns) as float, everything else as str. The ecotaxa type row is not a row."""
    check_format(fmt)
    if fmt == PARQUET:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    # utf-8-sig: drops the BOM of an ecotaxa file, reads the others unchanged
    with Path(path).open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter="," if fmt == CSV else "\t"))
    if fmt == ECOTAXA:
        types, rows = (rows[0], rows[1:]) if rows else ({}, [])
        numeric = {name for name, t in types.items() if t == "[f]"}
    else:
        numeric = {name for name in (rows[0] if rows else {}) if name.startswith("prob_")}
    return [{n: (float(v) if v else None) if n in numeric else v for n, v in r.items()} for r in rows]
