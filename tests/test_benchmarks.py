"""The loader benchmarks run end to end on a tiny generated set and report what docs/BENCHMARKS.md reads.

Only that they run and report consistent rows: their speed is measured by hand, never in a test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--images", "40", "--batch", "8", "--shard-maxcount", "10"]


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loader-bench")


def test_loader_benchmark_rows_and_ratios(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    backends = ["imagefolder", "webdataset", "torchvision-gpu", "ceiling", "ceiling-parallel"]
    stdout = run("loader.py", *TINY, "--data", str(data), "--batches", "2", "--warmup-batches", "1",
                 "--repeats", "2", "--workers", "2", "--backends", *backends, "--json", str(out))
    rows = {r["backend"]: r for r in json.loads(out.read_text())}
    assert list(rows) == backends
    for name in ("imagefolder", "webdataset", "ceiling", "ceiling-parallel"):
        row = rows[name]
        assert row["images_per_s"] > 0 and row["min"] <= row["images_per_s"] <= row["max"], row
        assert (row["batch"], row["workers"], row["images"], row["repeats"]) == (8, 2, 40, 2)
    web = rows["webdataset"]
    assert web["ratio_to_ceiling"] == pytest.approx(web["images_per_s"] / rows["ceiling"]["images_per_s"])
    assert web["ratio_to_imagefolder"] == pytest.approx(
        web["images_per_s"] / rows["imagefolder"]["images_per_s"])
    if rows["torchvision-gpu"]["images_per_s"] is None:  # no GPU here: a row that says so, not a number
        assert "not measured" in rows["torchvision-gpu"]["note"]
    assert "| webdataset |" in stdout
    assert "webdataset / ceiling = " in stdout and "webdataset / ceiling-parallel = " in stdout


def test_worker_profile_accounts_for_the_worker_time(data: Path) -> None:
    stdout = run("worker_profile.py", *TINY, "--data", str(data), "--epochs", "1", "--workers", "2")
    header, _, values = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = dict(zip([h.strip() for h in header.strip("|").split("|")],
                     [float(v) for v in values.strip("|").split("|")], strict=True))
    # the parts are measured separately and must add up to the time the worker spent making batches
    parts = cells["prepare (us)"] + cells["assemble (us)"] + cells["rest (us)"]
    assert parts == pytest.approx(cells["busy (us)"], abs=2)
    assert cells["prepare (us)"] > 0 and 0 < cells["overhead"] < 1


def test_decode_paths_rows(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    stdout = run("decode_paths.py", "--source-images", "40", "--shard-maxcount", "10", "--data", str(data),
                 "--images", "6", "--repeats", "2", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["step"]) for r in rows] == [
        ("torchvision.io", "decode"), ("PIL", "decode"), ("torchvision.io", "decode+augment"),
        ("PIL", "decode+augment")]
    for r in rows:
        assert r["images"] == 6 and r["min"] <= r["us_per_image"] <= r["max"]
        assert r["images_per_s"] == pytest.approx(1e6 / r["us_per_image"])
    assert [r["speed_vs_torchvision"] for r in rows if r["backend"] == "torchvision.io"] == [1.0, 1.0]
    assert "| PIL | decode+augment |" in stdout
