"""EcoTaxa's export conventions: the type row under the header, and each object's annotation status.

An export's first data row types each column (`[t]` text, `[f]` float): it is no object. The status
column (`object_annotation_status`) says how far a person vouched for the category: `validated`,
`predicted` (a machine's guess), `dubious`, `discarded` (in the current back end), or empty
(unclassified). The database stores it as one letter (V/P/D), so those are read too.
"""
from __future__ import annotations

import logging
from pathlib import Path

from shards.items import NO_STATUS
from trainer.runtime.exits import ConfigError

log = logging.getLogger("shards.ecotaxa")

STATUS_COLUMN = "object_annotation_status"
STATUSES = ("validated", "predicted", "dubious", "discarded", "unclassified")
_ALIASES = {"v": "validated", "p": "predicted", "d": "dubious", "": "unclassified"}
_TYPES = ("[t]", "[f]")
KNOWN = "validated, predicted, dubious, discarded or empty (unclassified); V/P/D for short"


def status_name(raw: str) -> str | None:
    """The status `raw` spells (any case, one-letter codes too); None when it spells none."""
    text = raw.strip().lower()
    return text if text in STATUSES else _ALIASES.get(text)


def is_type_row(header: list[str], cells: list[str], where: str) -> bool:
    """Whether `cells` (the first data row) is a type row; one only partly made of `[t]`/`[f]` is an
    error: a damaged export, whose other rows may be shifted as well."""
    cells = cells + [""] * (len(header) - len(cells))
    typed = [c.strip().lower() in _TYPES for c in cells]
    if not any(typed):
        return False
    if all(typed):
        return True
    names = header + [f"column {i + 1}" for i in range(len(header), len(cells))]
    odd = [f"{name}={cell!r}" for name, cell, ok in zip(names, cells, typed) if not ok]
    raise ConfigError(f"{where}: malformed EcoTaxa type row: every cell must be [t] or [f], these are "
                      f"not: {', '.join(odd[:8])}{' ...' if len(odd) > 8 else ''}")


def status_column(given: str | None, header: list[str], table: Path) -> str | None:
    """The column of annotation statuses: the one given, else EcoTaxa's when the table has it."""
    if given is not None:
        if given not in header:
            raise ConfigError(f"source.status_column: column {given!r} not in {table} (columns: {header})")
        return given
    if STATUS_COLUMN in header:
        log.info("%s: annotation statuses read from column %r (source.status_column names another); "
                 "rows are labelled only with a status in source.keep_status", table, STATUS_COLUMN)
        return STATUS_COLUMN
    return None


def row_status(record: dict[str, str], column: str | None, where: str) -> str:
    """The row's status (NO_STATUS without a status column); an unknown value is an error, not a guess."""
    if column is None:
        return NO_STATUS
    raw = record.get(column) or ""
    name = status_name(raw)
    if name is None:
        raise ConfigError(f"{where}: unknown annotation status {raw!r} in column {column!r} "
                          f"(known: {KNOWN})")
    return name


def kept_statuses(keep: list[str]) -> set[str]:
    """The statuses `source.keep_status` names; an unknown one is an error naming the key."""
    names = {s: status_name(s) for s in keep}
    unknown = [s for s, name in names.items() if name is None]
    if unknown:
        raise ConfigError(f"source.keep_status: unknown status {unknown} (known: {KNOWN})")
    return {name for name in names.values() if name}
