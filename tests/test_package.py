"""The wheel works without the repository: built from the files git would commit, installed (not
editable) into a fresh venv, its console scripts run from an unrelated directory with the configs
shipped inside the package.

The new venv borrows this venv's pinned dependencies through a `.pth` holding their folder as a plain
line: such a line only extends sys.path, so the editable install's own `.pth` finder there stays off
and `import trainer` can only find the wheel's copy (checked).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# the new venv's site-packages, asked of its own interpreter
SITE = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def run(*command: str | Path, cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def source_copy(dest: Path) -> Path:
    """The files git would commit (tracked and new, not ignored): no build/ or egg-info in the repo."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO)
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the work tree is not shipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("package")
    src = source_copy(tmp / "src")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
        src, cwd=tmp, timeout=300)
    wheel = next((tmp / "dist").glob("taxotrain-*.whl"))
    env = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", env, cwd=tmp)  # pip comes with the borrowed folder
    site = Path(run(env / "bin" / "python", "-c", SITE, cwd=tmp).strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(env / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp)
    return env


def test_the_wheel_not_the_checkout_is_imported(venv, tmp_path):
    where = run(venv / "bin" / "python", "-c", f"import conf, trainer; {SITE}; print(trainer.__file__); "
                "print(conf.__file__)", cwd=tmp_path).split()
    assert all(Path(p).is_relative_to(where[0]) for p in where[1:]), where
    assert not any(Path(p).is_relative_to(REPO) for p in where[1:]), where


@pytest.mark.parametrize(("tool", "says"), [
    ("taxotrain-train", "loader.batch_size = 64"), ("taxotrain-evaluate", "exclude_classes = []"),
    ("taxotrain-bag", "bag.members = 2"), ("taxotrain-curve", "curve.fractions = [0.1, 0.25, 0.5, 1.0]"),
    ("taxotrain-predict", "top_k = 5"), ("taxotrain-features", "pca = 0"), ("taxotrain-export", "out = null"),
    ("taxotrain-head", "head.trees = 300"),
])
def test_every_tool_answers_help_from_any_directory(venv, tmp_path, tool, says):
    assert says in run(venv / "bin" / tool, "--help", cwd=tmp_path)


def test_site_settings_come_from_config_dir(venv, tmp_path):
    """An installed package has no conf/local/ to edit in place; `--config-dir` adds a site folder."""
    (tmp_path / "site" / "local").mkdir(parents=True)
    (tmp_path / "site" / "local" / "default.yaml").write_text(
        "# @package _global_\nlauncher:\n  partition: gpu\n")
    shown = run(venv / "bin" / "taxotrain-train", "--config-dir", tmp_path / "site", "--cfg", "job",
                "data=synthetic", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "partition: gpu" in shown


def test_shards_build_and_verify_from_the_wheel(venv, tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(tmp_path / "images" / label / f"{i}.png")
    out = tmp_path / "shards"
    run(venv / "bin" / "taxotrain-shards", "source=imagefolder", f"source.root={tmp_path / 'images'}",
        f"out={out}", "shard.maxcount=4", "split.val=0", "split.test=0", cwd=tmp_path)
    assert (out / "_info.json").is_file()
    run(venv / "bin" / "taxotrain-verify", f"dir={out}", cwd=tmp_path)
