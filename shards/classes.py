"""Class names: which text may be one, the pinned class list (`source.classes`) and the fine -> coarse
class map (`source.class_map`), which a source applies before it computes its classes.

A class map is a table with a header row (`from,to` or `fine,coarse`) and one pair per row, its
delimiter detected like the source's. Chains resolve (a->b, b->c gives a->c); a cycle, a `from` class
the data never names, or a target outside a pinned class list is a `ConfigError` naming the file.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from shards.tables import read_table
from trainer.runtime.exits import ConfigError

MAP_HEADERS = (("from", "to"), ("fine", "coarse"))


def class_name_problem(name: str) -> str:
    """Why `name` cannot be a class ("" when it can). classes.txt holds one name per line: a newline
    (or CR, tab, any control or line-separator character) would split or blur a name there, and a
    build pinned to that file would shift every later class index without an error."""
    odd = "".join(sorted({ch for ch in name if unicodedata.category(ch) in ("Cc", "Zl", "Zp")}))
    if not odd:
        return ""
    return f"class name {name!r} contains control characters {odd!r}; rename it"


def shown(text: str) -> str:
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


def load_class_map(path: str | None, named: set[str], pinned: list[str] | None) -> dict[str, str]:
    """{fine: coarse} with chains resolved ({} without a map); `named`: every class the data names."""
    if path is None:
        return {}
    pairs = read_pairs(Path(path).expanduser())
    mapping = resolve(pairs, path)
    # a `from` reached only through another pair (b of a->b, b->c) is a link of a chain, not unknown
    known = named | {coarse for coarse, _ in pairs.values()}
    unknown = [(fine, line) for fine, (_, line) in pairs.items() if fine not in known]
    if unknown:
        listed = ", ".join(f"{fine!r} (line {line})" for fine, line in unknown[:10])
        raise ConfigError(f"source.class_map: {path}: unknown class {listed}: the data names no such class")
    outside = sorted({c for c in mapping.values() if pinned is not None and c not in pinned})
    if outside:
        raise ConfigError(f"source.class_map: {path} maps onto {outside}, which the class list "
                          f"(source.classes) does not name")
    return mapping


def read_pairs(path: Path) -> dict[str, tuple[str, int]]:
    """{fine: (coarse, line)} as the file writes it; a malformed row is an error naming its line."""
    table = read_table(path, None, "source.class_map")
    if tuple(h.strip().lower() for h in table.header) not in MAP_HEADERS:
        raise ConfigError(f"source.class_map: {path}:1: header {table.header} is neither from,to nor "
                          "fine,coarse (a header row is required)")
    pairs: dict[str, tuple[str, int]] = {}
    for line, cells in table.rows:
        fine, coarse = _pair(path, line, cells)
        if fine in pairs and pairs[fine][0] != coarse:
            raise ConfigError(f"source.class_map: {path}: {fine!r} maps to {pairs[fine][0]!r} (line "
                              f"{pairs[fine][1]}) and to {coarse!r} (line {line})")
        pairs.setdefault(fine, (coarse, line))
    return pairs


def _pair(path: Path, line: int, cells: list[str]) -> tuple[str, str]:
    names = [c.strip() for c in cells]
    if len(names) != 2 or not all(names):
        raise ConfigError(f"source.class_map: {path}:{line}: expected two class names, got {cells}")
    odd = [n for n in names if class_name_problem(n)]
    if odd:
        raise ConfigError(f"source.class_map: {path}:{line}: {class_name_problem(odd[0])}")
    return names[0], names[1]


def resolve(pairs: dict[str, tuple[str, int]], path: str) -> dict[str, str]:
    """Each fine class to the end of its chain; a pair onto itself is no regrouping."""
    step = {fine: coarse for fine, (coarse, _) in pairs.items() if fine != coarse}
    out = {}
    for start in pairs:
        chain = [start]
        while chain[-1] in step:
            nxt = step[chain[-1]]
            if nxt in chain:
                cycle = [*chain[chain.index(nxt):], nxt]
                raise ConfigError(f"source.class_map: {path}: the classes {' -> '.join(cycle)} form a cycle")
            chain.append(nxt)
        out[start] = chain[-1]
    return out
