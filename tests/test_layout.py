"""The rooms of the code and the one direction of their dependencies, read from the imports (`ast`).

From the bottom: `trainer.runtime` (process environment, signals, files, exits, the CLI) <- `shards`
<- `trainer.data`, `trainer.tracking` <- the training lifecycle at `trainer/`'s top <- `trainer.inference`
<- `trainer.jobs`, `trainer.heads` <- `launch` (thin entry points, which never import each other).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "shards", "launch")
RANK = {"trainer.runtime": 0, "shards": 1, "trainer.data": 2, "trainer.tracking": 2, "trainer": 3,
        "trainer.inference": 4, "trainer.jobs": 5, "trainer.heads": 5, "launch": 6}


def room(module: str) -> str:
    """The room of a dotted module name: its subpackage of trainer, or its top-level package."""
    parts = module.split(".")
    if parts[0] == "trainer" and len(parts) > 1 and f"trainer.{parts[1]}" in RANK:
        return f"trainer.{parts[1]}"
    return parts[0]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """Every taxotrain module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in PACKAGES}


def violations() -> list[str]:
    known = modules()
    found = []
    for name, path in sorted(known.items()):
        mine = room(name)
        for target in sorted(imports(path)):
            if target not in known:
                continue  # `from trainer import config` also lists `trainer`; the module is checked
            theirs = room(target)
            entry_to_entry = mine == theirs == "launch"
            if entry_to_entry or (theirs != mine and RANK[theirs] >= RANK[mine]):
                found.append(f"{name} ({mine}) imports {target} ({theirs})")
    return found


def test_every_module_is_in_a_room():
    assert {room(n) for n in modules()} <= set(RANK)


def test_dependencies_point_one_way():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    assert room("trainer.data.streams") == "trainer.data" and room("trainer.loop") == "trainer"
    fake = tmp_path / "m.py"
    fake.write_text("from trainer.jobs.bag import train_bag\nfrom launch.train import main\n")
    assert imports(fake) == {"trainer.jobs.bag", "trainer.jobs.bag.train_bag", "launch.train",
                             "launch.train.main"}
    known = modules()
    monkeypatch.setattr(__import__(__name__), "modules", lambda: {**known, "trainer.data.fake": fake,
                                                                    "launch.fake": fake})
    assert violations() == ["launch.fake (launch) imports launch.train (launch)",
                            "trainer.data.fake (trainer.data) imports launch.train (launch)",
                            "trainer.data.fake (trainer.data) imports trainer.jobs.bag (trainer.jobs)"]
