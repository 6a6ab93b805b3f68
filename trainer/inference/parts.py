"""Predictions as parts: one parquet file per (array task, rank), its record, the manifest and the merge.

Why: gathering every row to rank 0 holds the whole run in one process (750M objects do not fit). With
`parts=true` each rank streams its rows into its own part, batch by batch, and only counts cross ranks.

A unit of work is (task, rank): task t of n predicts the split's shards with index % n == t (as
`shards.build` cuts an array), and inside a task EvalStream deals pieces to the ranks. Part
`part-TTTTT-RRRRR` is three files in the output folder:

- `rows/<part>.parquet`: its rows (`outputs.part_header`: object_id, key, path, class_i/prob_i,
  decision), written batch by batch through a hidden temporary renamed at the end, so a killed task
  leaves no complete-looking part. Only parts live in `rows/`: pandas, Spark and pyarrow read the
  folder as one dataset, and skip the hidden temporaries of a task still running;
- `<part>.unreadable.tsv`: the inputs that could not be read (key, shard, reason), the same way;
- `<part>.json`, the record, written last: the part's identity (split, task, world, rank, the pieces
  covered with their shard's sha256 from `_info.json`, the settings digest) and its counts, which
  reconcile: inputs = predicted + unreadable. No record, no part: a rerun writes it again; a part
  whose record matches what the rerun would write (identity, file size, parquet rows) is skipped.

The merge (`stage=merge`, or rank 0 at the end of a single task) reads the records only, checks that
every task's parts exist, cover its shards exactly and reconcile with the split's sample count, and
writes `manifest.json`; with `merge_file` it streams the parts into one predictions file. A missing or
inconsistent part is a `PartsIncomplete` naming it (exit 1: the command was right and the work is not
finished; rerunning the named array task completes it, as an incomplete `shards.build` array does).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from trainer.data import streams as data
from trainer.data.shardset import ShardSet
from trainer.inference.outputs import PredictionRow, TableWriter, arrow_schema, part_header, rows_batch
from trainer.runtime.exits import RunFailure
from trainer.runtime.files import TEMP_INFIX, atomic_path, atomic_write

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
ROWS = "rows"  # the parquet parts, and nothing else
FORMAT = "taxotrain-prediction-parts/1"
BAD_HEADER = ["key", "shard", "reason"]
# what must be equal for a finished part to stand for this run's part
IDENTITY = ("split", "task_index", "task_count", "rank", "world", "pieces", "settings")


class PartsIncomplete(RunFailure):
    """A part is missing, damaged or does not reconcile: the message names it and the task to rerun."""


# ---------------------------------------------------------------- units of work


def stem(task: int, rank: int) -> str:
    return f"part-{task:05d}-{rank:05d}"


def rows_file(name: str) -> str:
    return f"{ROWS}/{name}.parquet"


def task_split(split: ShardSet, task_index: int, task_count: int) -> ShardSet:
    """The split's shards of one array task (index % task_count == task_index); none past the last."""
    return replace(split, shards=tuple(s for i, s in enumerate(split.shards) if i % task_count == task_index))


def covered(stream: data.EvalStream, split: ShardSet) -> list[dict]:
    """The pieces this rank's stream reads (every worker's), each with its shard's digest."""
    mine = sorted((stream.pieces[i] for slot in stream.slots for i in slot),
                  key=lambda p: (p.shard.name, p.first))
    return [{"shard": p.shard.name, "first": p.first, "end": p.end, "sha256": p.shard.sha256} for p in mine]


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- writing one part


class PartWriter:
    """Rows and unreadable inputs of one part, streamed through temporaries (published on a clean exit,
    removed on an error); `finish()` afterwards writes the record. Holds one batch, never the rows."""

    def __init__(self, folder: Path, name: str, k: int) -> None:
        self.folder, self.name, self.k, self.header = folder, name, k, part_header(k)
        self.predicted = self.unreadable = self.auto = self.object_ids = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> PartWriter:
        import pyarrow.parquet as pq

        clean_temps(self.folder, self.name)
        (self.folder / f"{self.name}.json").unlink(missing_ok=True)  # no old record vouches for new files
        rows_tmp = self._stack.enter_context(atomic_path(self.folder / rows_file(self.name)))
        bad_tmp = self._stack.enter_context(atomic_path(self.folder / f"{self.name}.unreadable.tsv"))
        self._rows = pq.ParquetWriter(rows_tmp, arrow_schema(self.header))
        self._stack.callback(self._rows.close)  # closed before its temporary is renamed
        fh = self._stack.enter_context(open(bad_tmp, "x", newline="", encoding="utf-8"))
        self._bad = csv.writer(fh, delimiter="\t", lineterminator="\n")
        self._bad.writerow(BAD_HEADER)
        return self

    def add(self, rows: Sequence[PredictionRow], bad: Iterable[data.BadRecord]) -> None:
        bad = list(bad)
        self._bad.writerows([b.key, b.shard, b.reason] for b in bad)
        self.unreadable += len(bad)
        if rows:
            self._rows.write_batch(rows_batch(rows, self.header))
            self.predicted += len(rows)
            self.auto += sum(r.decision == "auto" for r in rows)
            self.object_ids += sum(bool(r.object_id) for r in rows)

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)

    def finish(self, identity: dict, inputs: int) -> dict:
        """The record, written last; the counts must reconcile with the inputs of the pieces covered."""
        if self.predicted + self.unreadable != inputs:  # a lost or doubled image must never pass unnoticed
            raise data.DataError(f"{self.name}: {inputs} inputs but {self.predicted} predicted + "
                                 f"{self.unreadable} unreadable")
        record = {**identity, "inputs": inputs, "predicted": self.predicted, "unreadable": self.unreadable,
                  "auto": self.auto, "object_ids": self.object_ids, "k": self.k,
                  "rows_file": rows_file(self.name), "unreadable_file": f"{self.name}.unreadable.tsv",
                  "bytes": (self.folder / rows_file(self.name)).stat().st_size}
        atomic_write(self.folder / f"{self.name}.json", json.dumps(record, indent=1) + "\n")
        return record


def clean_temps(folder: Path, name: str) -> None:
    """The temporaries a killed writer of this part left (never a sibling task's, which may be running)."""
    for tmp in [*folder.glob(f".{name}.*{TEMP_INFIX}*"), *(folder / ROWS).glob(f".{name}.*{TEMP_INFIX}*")]:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- records


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise PartsIncomplete(f"{path}: unreadable part record ({err}); delete it and rerun its "
                              f"task") from None
    return record if isinstance(record, dict) else None


def part_problem(folder: Path, record: dict) -> str | None:
    """Why the files of a record do not stand for it (missing, resized, other row count), or None."""
    import pyarrow.parquet as pq

    for key in ("rows_file", "unreadable_file"):
        if not (folder / record[key]).is_file():
            return f"{folder / record[key]} is missing (listed in {record['part']}.json)"
    rows = folder / record["rows_file"]
    if rows.stat().st_size != record["bytes"]:
        return f"{rows}: {rows.stat().st_size} bytes, its record says {record['bytes']}"
    found = pq.ParquetFile(rows).metadata.num_rows
    if found != record["predicted"]:
        return f"{rows}: {found} rows, its record says {record['predicted']}"
    if record["predicted"] + record["unreadable"] != record["inputs"]:
        return f"{record['part']}: {record['inputs']} inputs but {record['predicted']} predicted + " \
               f"{record['unreadable']} unreadable"
    return None


def finished(folder: Path, identity: dict) -> dict | None:
    """The record of this part when its files exist and it was written for the same work, else None."""
    record = read_record(folder / f"{identity['part']}.json")
    if record is None or any(record.get(k) != identity[k] for k in IDENTITY):
        return None
    return record if part_problem(folder, record) is None else None


# ---------------------------------------------------------------- the merge


def merge(folder: Path, split: ShardSet, source: str) -> dict:
    """`manifest.json` from every record in `folder`; PartsIncomplete naming every missing or
    inconsistent part. Reads records and parquet footers only, never rows."""
    records = sorted((r for p in sorted(folder.glob("part-*.json")) if (r := read_record(p)) is not None),
                     key=lambda r: (r["task_index"], r["rank"]))
    if not records:
        raise PartsIncomplete(f"{folder}: no parts (part-*.json); run stage=write (every array task) first")
    problems = _agreement(records, split) + [p for r in records if (p := part_problem(folder, r))]
    problems += _coverage(records, split)
    if problems:
        raise PartsIncomplete("predictions are incomplete:\n  " + "\n  ".join(problems))
    manifest = _manifest(records, split, source)
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _agreement(records: list[dict], split: ShardSet) -> list[str]:
    """Every part from the same split, array size and settings (leftovers of another run are named)."""
    first = records[0]
    return [f"{r['part']}.json: written with {key}={r[key]!r}, {first['part']}.json with {first[key]!r} "
            f"(a leftover of another run? delete it)" for r in records[1:]
            for key in ("split", "task_count", "settings") if r[key] != first[key]] + \
           ([f"{first['part']}.json: split {first['split']!r}, not {split.split!r}"]
            if first["split"] != split.split else [])


def _coverage(records: list[dict], split: ShardSet) -> list[str]:
    """Each task: all its ranks' parts, covering exactly its shards' samples with today's digests."""
    count = records[0]["task_count"]
    problems = []
    for task in range(count):
        shards = task_split(split, task, count).shards
        mine = [r for r in records if r["task_index"] == task]
        if not mine:
            names = ", ".join(s.name for s in shards[:4]) + (", ..." if len(shards) > 4 else "")
            problems.append(f"task {task} of {count}: no part ({stem(task, 0)}.json missing; shards "
                            f"{names or 'none'}): rerun array task {task}")
            continue
        world = mine[0]["world"]
        missing = sorted(set(range(world)) - {r["rank"] for r in mine})
        problems += [f"{stem(task, r)}.json missing (task {task}, rank {r} of {world}): rerun array task "
                     f"{task}" for r in missing]
        problems += _pieces(task, shards, [p for r in mine for p in r["pieces"]])
    return problems


def _pieces(task: int, shards: Sequence, pieces: list[dict]) -> list[str]:
    """The pieces of a task's parts against its shards: every sample once, the digest unchanged."""
    problems = []
    for shard in shards:
        spans = sorted((p["first"], p["end"]) for p in pieces if p["shard"] == shard.name)
        ends = [0] + [end for _, end in spans]
        if [a for a, _ in spans] != ends[:-1] or ends[-1] != shard.num_samples:
            problems.append(f"task {task}: {shard.name} is covered as {spans}, not [0, {shard.num_samples}) "
                            f"once: rerun array task {task}")
        digests = {p["sha256"] for p in pieces if p["shard"] == shard.name}
        if digests - {shard.sha256}:
            problems.append(f"task {task}: {shard.name} was predicted with sha256 {sorted(digests)[0]}, the "
                            f"manifest now says {shard.sha256}: rerun array task {task}")
    names = {s.name for s in shards}
    strays = sorted({p["shard"] for p in pieces} - names)
    return problems + [f"task {task}: parts cover {name}, which is not one of its shards" for name in strays]


def _manifest(records: list[dict], split: ShardSet, source: str) -> dict:
    totals = {k: sum(r[k] for r in records) for k in ("inputs", "predicted", "unreadable", "auto")}
    if totals["inputs"] != split.num_samples:
        raise PartsIncomplete(f"parts list {totals['inputs']} inputs, the split {split.split!r} has "
                              f"{split.num_samples} samples")
    parts = [{k: r[k] for k in ("part", "task_index", "rank", "rows_file", "unreadable_file", "inputs",
                                "predicted", "unreadable", "auto", "object_ids", "bytes")}
             | {"shards": sorted({p["shard"] for p in r["pieces"]})} for r in records]
    return {"format": FORMAT, "input": source, "split": split.split, "samples": split.num_samples,
            "task_count": records[0]["task_count"], "k": records[0]["k"], "settings": records[0]["settings"],
            **totals, "object_ids": sum(r["object_ids"] for r in records), "parts": parts}


def merge_file(folder: Path, manifest: dict, out: Path, fmt: str) -> Path:
    """One predictions file (and its `.unreadable` sibling) streamed from the parts, in part order
    (task, rank), each part's rows in the order it wrote them: memory holds one row group."""
    import pyarrow.parquet as pq

    header = part_header(manifest["k"])[0 if manifest["object_ids"] else 1:]
    with TableWriter(out, fmt, header) as table:
        for part in manifest["parts"]:
            for batch in pq.ParquetFile(folder / part["rows_file"]).iter_batches(batch_size=4096):
                table.write(batch.to_pylist())
    suffix = ".csv" if out.suffix.lower() == ".csv" else ".tsv"
    sibling = out.with_name(f"{out.stem}.unreadable{suffix}")
    _merge_unreadable(folder, manifest, sibling, "," if suffix == ".csv" else "\t")
    return sibling


def _merge_unreadable(folder: Path, manifest: dict, sibling: Path, delimiter: str) -> None:
    with atomic_path(sibling) as tmp, open(tmp, "x", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=delimiter, lineterminator="\n")
        writer.writerow(BAD_HEADER)
        for part in manifest["parts"]:
            with open(folder / part["unreadable_file"], newline="", encoding="utf-8") as bad:
                reader = csv.reader(bad, delimiter="\t")
                next(reader, None)
                writer.writerows(reader)
