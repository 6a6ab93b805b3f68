"""Enumerate a collection (class folders, a folder of images, a CSV/TSV table, the demo digits) into items.

Nothing is opened here beyond directory listings and the table: image checks happen in the
writer processes. Every row or file that cannot become an item is returned as a `Reject`.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from shards.classes import class_name_problem, load_class_map, read_class_list, shown
from shards.config import DemoSource, ImageFolderSource, ImagesSource, SourceConfig
from shards.items import UNLABELLED, Collection, Item, Reject, dedupe
from shards.keys import WHOLE, Part, key_from_path
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


def from_imagefolder(cfg: ImageFolderSource, part: Part = WHOLE) -> Collection:
    """Class folders; with `part`, only the files of that share (the class list stays the whole one:
    it is read from the folder names)."""
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
    rejects = [Reject(f, "", "", "file outside any class folder")
               for f in stray if part.takes(key_from_path(f))]
    rejects += [Reject(shown(rel), "", shown(d), class_name_problem(d))
                for d in odd for rel in walk(root, d, part)]
    # each file of an unlisted class folder is an input of its own, so each is reported
    rejects += [Reject(rel, "", d, f"class {d!r} not in {cfg.classes}")
                for d in found if coarse[d] not in classes for rel in walk(root, d, part)]
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for d in (d for d in found if coarse[d] in index):
        fine = d if coarse[d] != d else ""
        for rel in walk(root, d, part):
            items.append(Item(key_from_path(rel), str(root / rel), rel, index[coarse[d]], None, fine=fine))
    counts = Counter(it.label for it in items)
    empty = [c for i, c in enumerate(classes) if not counts[i]]
    return Collection(classes, dedupe(items, rejects, classes), rejects, empty, class_map=mapping)


def from_images(cfg: ImagesSource, part: Part = WHOLE) -> Collection:
    """Every image file under `root` (of the share `part`), unlabelled; keys from the relative paths."""
    root = _root(cfg.root)
    items, rejects = [], []
    for rel in walk(root, "", part):
        if Path(rel).suffix.lower() in IMAGE_SUFFIXES:
            items.append(Item(key_from_path(rel), str(root / rel), rel, UNLABELLED, cfg.unlabelled))
        else:
            rejects.append(Reject(shown(rel), cfg.unlabelled, "", "not an image file"))
    # pinned classes: the ones a model trained elsewhere will predict; none otherwise
    classes = read_class_list(cfg.classes) if cfg.classes else []
    return Collection(classes, dedupe(items, rejects, classes), rejects, unlabelled=cfg.unlabelled)


def walk(root: Path, sub: str = "", part: Part = WHOLE) -> Iterator[str]:
    """Paths relative to `root` of the files under `root/sub`, sorted, hidden ones left out; with
    `part`, only that share's. A generator: a partitioned task holds one folder's names at a time."""
    for dirpath, dirnames, filenames in os.walk(root / sub):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        base = Path(dirpath).relative_to(root).as_posix()
        for f in sorted(filenames):
            rel = f if base == "." else f"{base}/{f}"
            if not _hidden(f) and (part.count == 1 or part.takes(key_from_path(rel))):
                yield rel


def from_demo(cfg: DemoSource, part: Part = WHOLE) -> Collection:
    from shards.demo import MEASURE_NAMES, read_measures, write_demo_digits

    root = write_demo_digits(Path(cfg.root).expanduser())
    found = from_imagefolder(ImageFolderSource(root=str(root), classes=cfg.classes, class_map=cfg.class_map),
                             part)
    measures = read_measures(root)  # the instrument-like native features of every digit
    found.items = [replace(it, features=measures[it.rel]) for it in found.items]
    found.feature_names = list(MEASURE_NAMES)
    return found


def collect(cfg: SourceConfig, part: Part = WHOLE) -> Collection:
    """The collection `cfg` names, or one array task's share of it (`part`)."""
    readers = {"imagefolder": from_imagefolder, "csv": from_csv, "demo": from_demo, "images": from_images}
    if cfg.kind not in readers:
        raise ConfigError(f"source.kind: unknown source {cfg.kind!r} ({' | '.join(readers)})")
    return readers[cfg.kind](cfg, part)
