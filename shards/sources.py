"""Enumerate a collection (class folders, a folder of images, a CSV/TSV table, the demo digits) into items.

Nothing is opened here beyond directory listings and the table: image checks happen in the
writer processes. Every row or file that cannot become an item is returned as a `Reject`.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

from shards.classes import class_name_problem, load_class_map, read_class_list, shown
from shards.config import DemoSource, ImageFolderSource, ImagesSource, SourceConfig
from shards.items import UNLABELLED, Collection, Item, Reject, dedupe
from shards.keys import key_from_path
from shards.table_source import from_csv
from trainer.runtime.exits import ConfigError

# ignored everywhere: version control, notebooks, macOS and Windows litter
_IGNORED_FILES = {"Thumbs.db", "desktop.ini"}
# what an images source lists; every other file is reported, so the counts reconcile
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_FILES


def _root(given: str) -> Path:
    root = Path(given).expanduser()
    if not root.is_dir():
        raise ConfigError(f"source.root: {root} is not a directory")
    return root


def from_imagefolder(cfg: ImageFolderSource) -> Collection:
    root = _root(cfg.root)
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name))
    # each file of a folder whose name cannot be a class is an input of its own, quarantined
    odd = [d for d in found if class_name_problem(d)]
    found = [d for d in found if d not in odd]
    # not is_dir(): a dangling symlink is a lost input too, and must be reported
    stray = sorted(f.name for f in root.iterdir() if not f.is_dir() and not _hidden(f.name))
    pinned = read_class_list(cfg.classes) if cfg.classes else None
    mapping = load_class_map(cfg.class_map, set(found), pinned)
    coarse = {d: mapping.get(d, d) for d in found}
    classes = pinned or sorted(set(coarse.values()))
    rejects = [Reject(f, "", "", "file outside any class folder") for f in stray]
    rejects += [Reject(shown(f.relative_to(root).as_posix()), "", shown(d), class_name_problem(d))
                for d in odd for f in walk(root / d)]
    # each file of an unlisted class folder is an input of its own, so each is reported
    rejects += [Reject(f.relative_to(root).as_posix(), "", d, f"class {d!r} not in {cfg.classes}")
                for d in found if coarse[d] not in classes for f in walk(root / d)]
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for d in (d for d in found if coarse[d] in index):
        fine = d if coarse[d] != d else ""
        for f in walk(root / d):
            rel = f.relative_to(root).as_posix()
            items.append(Item(key_from_path(rel), str(f), rel, index[coarse[d]], None, fine=fine))
    counts = Counter(it.label for it in items)
    empty = [c for i, c in enumerate(classes) if not counts[i]]
    return Collection(classes, dedupe(items, rejects, classes), rejects, empty, class_map=mapping)


def from_images(cfg: ImagesSource) -> Collection:
    """Every image file under `root`, unlabelled; keys from the relative paths."""
    root = _root(cfg.root)
    items, rejects = [], []
    for f in walk(root):
        rel = f.relative_to(root).as_posix()
        if f.suffix.lower() in IMAGE_SUFFIXES:
            items.append(Item(key_from_path(rel), str(f), rel, UNLABELLED, cfg.unlabelled))
        else:
            rejects.append(Reject(shown(rel), cfg.unlabelled, "", "not an image file"))
    # pinned classes: the ones a model trained elsewhere will predict; none otherwise
    classes = read_class_list(cfg.classes) if cfg.classes else []
    return Collection(classes, dedupe(items, rejects, classes), rejects, unlabelled=cfg.unlabelled)


def walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        out += [Path(dirpath) / f for f in sorted(filenames) if not _hidden(f)]
    return out


def from_demo(cfg: DemoSource) -> Collection:
    from shards.demo import MEASURE_NAMES, read_measures, write_demo_digits

    root = write_demo_digits(Path(cfg.root).expanduser())
    found = from_imagefolder(ImageFolderSource(root=str(root), classes=cfg.classes, class_map=cfg.class_map))
    measures = read_measures(root)  # the instrument-like native features of every digit
    found.items = [replace(it, features=measures[it.rel]) for it in found.items]
    found.feature_names = list(MEASURE_NAMES)
    return found


def collect(cfg: SourceConfig) -> Collection:
    readers = {"imagefolder": from_imagefolder, "csv": from_csv, "demo": from_demo, "images": from_images}
    if cfg.kind not in readers:
        raise ConfigError(f"source.kind: unknown source {cfg.kind!r} ({' | '.join(readers)})")
    return readers[cfg.kind](cfg)
