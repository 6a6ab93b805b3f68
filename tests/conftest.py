"""Shared fixtures: tiny real image collections made on the fly (no downloads)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import build
from shards.config import ShardConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm_cluster import slurm_cluster  # noqa: E402,F401  (session fixture for tests marked slurm)


@pytest.fixture
def offline_wandb(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline, pointed at a closed port, with a private home: no network, no user settings."""
    home = tmp_path_factory.mktemp("wandb-home")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def save_image(path: Path, size=(32, 24), mode="RGB", fmt=None, seed=0, **kw) -> Path:
    """A small real image with random content, saved in `fmt` (default: from the suffix)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path, format=fmt, **kw)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 10 clean JPEG/PNG images."""
    root = tmp_path / "images"
    for c, cls in enumerate(["ant", "bee", "cat"]):
        for i in range(10):
            ext = "jpg" if i % 2 else "png"
            save_image(root / cls / f"{cls}{i}.{ext}", seed=100 * c + i)
    return root


def run_build(out: Path, source, **kw) -> dict:
    """Build through the same typed config the CLI uses."""
    cfg = ShardConfig(source=source, out=str(out), **kw)
    return build(cfg)
