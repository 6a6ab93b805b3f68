"""Reading a delimited table (CSV/TSV): its delimiter, header and rows, each row with its line number."""
from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.runtime.exits import ConfigError


@dataclass(frozen=True)
class Table:
    path: Path
    header: list[str]
    # (line of the row's last physical line, cells): a list, or a single-pass iterator when streamed
    rows: Iterable[tuple[int, list[str]]]

    def record(self, cells: list[str]) -> dict[str, str]:
        """`cells` by column name; a short row lacks its last columns (`.get` gives None)."""
        return dict(zip(self.header, cells))


def delimiter(path: Path, first_line: str, given: str | None) -> str:
    if given:
        return "\t" if given in ("\\t", "tab") else given
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    counts = {d: first_line.count(d) for d in ("\t", ",", ";")}
    return max(counts, key=counts.get)


def read_table(path: Path, given: str | None, key: str, stream: bool = False) -> Table:
    """The whole table, or (`stream`) its header and an iterator over its rows, read once, so that a
    table larger than memory can be filtered; `key` (the setting that named it) opens every error message."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    rows = _rows(path, given, key)
    header = next(rows)
    return Table(path, header, rows if stream else list(rows))


def _rows(path: Path, given: str | None, key: str) -> Iterator:
    """The header, then (line, cells) of every non-empty row."""
    try:
        # utf-8-sig: a BOM (EcoTaxa writes one) must not become part of the first column's name
        with path.open(newline="", encoding="utf-8-sig") as fh:
            first = fh.readline()
            fh.seek(0)
            reader = csv.reader(fh, delimiter=delimiter(path, first, given))
            yield next(reader, [])
            yield from ((reader.line_num, cells) for cells in reader if cells)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{key}: cannot read {path}: {err}") from None
