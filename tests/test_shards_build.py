"""Building shards: splits, determinism, read-back through tar/webdataset/DALI, verify, interruption."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import shard_readers as readers
from conftest import REPO, run_build, save_image

from shards import writer as writer_mod
from shards.build import build
from shards.config import ImageFolderSource, ShardConfig, ShardSizeConfig, SplitConfig
from shards.manifest import IncompleteBuild
from shards.verify import verify
from trainer.runtime.exits import ConfigError
from trainer.runtime.files import sha256_file


def _files(root: Path) -> dict[str, bytes]:
    names = [p for p in root.iterdir() if p.suffix in (".tar", ".idx") or p.name.endswith((".tsv", ".txt"))]
    return {p.name: p.read_bytes() for p in names} | {"_info.json": (root / "_info.json").read_bytes()}


def _split_keys(info: dict, root: Path) -> dict[str, set[str]]:
    return {s: {k for k, _, _ in readers.read_with_python_tarfile(root, s)} for s in info["splits"]}


@pytest.fixture
def big_folder(tmp_path: Path) -> Path:
    """4 classes of unequal size (40, 30, 20, 10) so stratification is visible."""
    root = tmp_path / "big"
    for c, n in enumerate([40, 30, 20, 10]):
        for i in range(n):
            save_image(root / f"class{c}" / f"img{i}.png", size=(8, 8), seed=1000 * c + i)
    return root


def test_split_is_stratified_and_seeded(big_folder, tmp_path):
    split = SplitConfig(val=0.2, test=0.1)
    info = run_build(tmp_path / "a" / "s", ImageFolderSource(root=str(big_folder)), split=split, seed=1)
    for c, n in enumerate([40, 30, 20, 10]):
        counts = {s: info["splits"][s]["class_counts"][c] for s in ("train", "val", "test")}
        assert counts["val"] == round(n * 0.2) and counts["test"] == round(n * 0.1)
        assert sum(counts.values()) == n
    same = run_build(tmp_path / "b" / "s", ImageFolderSource(root=str(big_folder)), split=split, seed=1)
    other = run_build(tmp_path / "c" / "s", ImageFolderSource(root=str(big_folder)), split=split, seed=2)
    keys = _split_keys(info, tmp_path / "a" / "s")
    assert keys == _split_keys(same, tmp_path / "b" / "s")
    assert keys["val"] != _split_keys(other, tmp_path / "c" / "s")["val"]
    assert not (keys["train"] & keys["val"]) and not (keys["val"] & keys["test"])


def test_samples_are_shuffled_before_writing(big_folder, tmp_path):
    run_build(tmp_path / "s", ImageFolderSource(root=str(big_folder)))
    labels = [c for _, _, c in readers.read_with_python_tarfile(tmp_path / "s", "train")]
    # sorted input would give long runs of one class; a shuffle gives many class changes
    changes = sum(a != b for a, b in zip(labels, labels[1:]))
    assert changes > len(labels) / 3


def test_rebuild_is_byte_identical(image_folder, tmp_path):
    run_build(tmp_path / "a" / "shards", ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(7))
    run_build(tmp_path / "b" / "shards", ImageFolderSource(root=str(image_folder)),
              shard=ShardSizeConfig(7), workers=2)
    a, b = _files(tmp_path / "a" / "shards"), _files(tmp_path / "b" / "shards")
    assert len([n for n in a if n.endswith(".tar")]) >= 4
    assert a == b


def test_shard_size_limits(image_folder, tmp_path):
    info = run_build(tmp_path / "n", ImageFolderSource(root=str(image_folder)),
                     shard=ShardSizeConfig(maxcount=4), split=SplitConfig(0, 0))
    assert info["splits"]["train"]["shard_lengths"] == [4] * 7 + [2]
    limit = 3 * max(p.stat().st_size for p in image_folder.rglob("*.*"))
    info = run_build(tmp_path / "b", ImageFolderSource(root=str(image_folder)),
                     shard=ShardSizeConfig(maxsize=limit), split=SplitConfig(0, 0))
    assert len(info["splits"]["train"]["filenames"]) > 1
    for name in info["splits"]["train"]["filenames"]:
        with tarfile.open(tmp_path / "b" / name) as tar:
            payload = sum(m.size for m in tar if m.name.endswith((".png", ".jpg")))
        assert payload <= limit
    assert sum(info["splits"]["train"]["shard_lengths"]) == 30


def test_tar_headers_are_plain_ustar_with_fixed_owner_and_mtime(image_folder, tmp_path):
    run_build(tmp_path / "s", ImageFolderSource(root=str(image_folder)))
    raw = (tmp_path / "s" / "train-000000.tar").read_bytes()
    assert raw[257:263] == b"ustar\x00"  # POSIX ustar magic, no PAX extension headers
    with tarfile.open(tmp_path / "s" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert all(m.type == tarfile.REGTYPE and not m.pax_headers for m in members)
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", writer_mod.MTIME)}


def test_every_sample_reads_back_equal_through_tar_webdataset_and_dali(image_folder, tmp_path):
    root = tmp_path / "s"
    run_build(root, ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(maxcount=6))
    info = readers.manifest(root)
    for split in ("train", "val", "test"):
        truth = {}
        for key, img, cls in readers.read_with_python_tarfile(root, split):
            truth[key] = (img, cls)
        assert len(truth) == info["splits"][split]["num_samples"]
        gnu = readers.read_with_gnu_tar(root, split, tmp_path / f"x-{split}")
        assert {k: (i, c) for k, i, c in gnu} == truth
        wds = readers.read_with_webdataset(root, split)
        assert len(wds) == len(truth) and {k: (i, c) for k, i, c in wds} == truth
        dali = readers.read_with_dali(root, split)
        assert len(dali) == len(truth)
        by_path = {p: (i, c) for p, i, c in dali}
        for path, (img, cls) in by_path.items():
            assert (image_folder / path).read_bytes() == img
            assert info["classes"][cls] == path.split("/")[0]
        assert sorted(by_path.values()) == sorted(truth.values())


def test_index_files_equal_dali_wds2idx(image_folder, tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI extra not installed")
    root = tmp_path / "s"
    run_build(root, ImageFolderSource(root=str(image_folder)))
    for shard in root.glob("*.tar"):
        theirs = tmp_path / (shard.stem + ".theirs.idx")
        with wds2idx.IndexCreator(str(shard), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert (root / (shard.stem + ".idx")).read_text() == theirs.read_text()


def test_verify_accepts_a_build_and_catches_changed_byte_truncation_and_missing_shard(image_folder, tmp_path):
    root = tmp_path / "s"
    run_build(root, ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(maxcount=5),
              split=SplitConfig(0, 0))
    assert verify(root, decode=True) == []
    shards = sorted(root.glob("train-*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[700] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    # cut at a member boundary: tar readers see a shorter, valid-looking archive
    whole = shards[1].read_bytes()
    shards[1].write_bytes(whole[:512 * 6])
    shards[2].unlink()
    problems = verify(root)
    assert any(shards[0].name in p and "sha256" in p for p in problems)
    assert any(shards[1].name in p and "samples" in p for p in problems)
    assert any(shards[2].name in p and "missing" in p for p in problems)
    (root / "train-000003.idx").write_text("v1.2 1\njunk 0 1 x.jpg\n")
    assert any("train-000003.idx" in p for p in verify(root))
    for malformed, line in (("v9 1\njpg 512 1 x.jpg\n", 1), ("v1.2 1\njpg x 1 x.jpg\n", 2)):
        (root / "train-000003.idx").write_text(malformed)
        assert any(p.startswith("train-000003.idx: malformed index:") and f"train-000003.idx:{line}:" in p
                   for p in verify(root))


def test_verify_cli_exit_codes(image_folder, tmp_path):
    root = tmp_path / "s"
    run_build(root, ImageFolderSource(root=str(image_folder)))
    cmd = [sys.executable, "-m", "shards.verify", f"dir={root}"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (root / "val-000000.tar").write_bytes(b"")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "MISMATCH val-000000.tar" in bad.stdout


class _Crash(Exception):
    pass


def test_interrupted_build_leaves_no_complete_looking_shard(image_folder, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run_build(clean, ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(maxcount=5))
    calls = {"n": 0}
    real = writer_mod.prepare

    def crash_midway(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # inside the second shard
            raise _Crash("simulated crash")
        return real(*a, **kw)

    out = tmp_path / "crashed"
    monkeypatch.setattr(writer_mod, "prepare", crash_midway)
    with pytest.raises(_Crash):
        run_build(out, ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(maxcount=5))
    assert not (out / "_info.json").exists()
    complete = sorted(p.name for p in out.glob("*.tar"))
    assert complete == ["train-000000.tar"]
    assert (out / "train-000000.tar").read_bytes() == (clean / "train-000000.tar").read_bytes()
    monkeypatch.setattr(writer_mod, "prepare", real)
    run_build(out, ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(maxcount=5))
    assert _files(out) == _files(clean) | {"_info.json": _files(out)["_info.json"]}
    assert not list(out.glob(".*.tmp-*"))


def test_killed_build_leaves_only_complete_shards(tmp_path):
    """SIGKILL a real build process at a random moment; whatever `*.tar` exists must verify."""
    src = tmp_path / "imgs"
    for i in range(300):
        save_image(src / f"c{i % 3}" / f"{i}.jpg", size=(256, 256), seed=i, quality=95)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shards.build", "source=imagefolder", f"source.root={src}",
           f"out={out}", "shard.maxcount=20", "split.val=0", "split.test=0", "resize.max_side=64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(out.glob("*.tar"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "_info.json").exists()
    for shard in out.glob("*.tar"):
        side_path = out / "_parts" / f"{shard.name}.json"
        if not side_path.exists():
            continue  # killed between the rename and its sidecar: unrecorded, so the re-run rewrites it
        assert sha256_file(shard) == json.loads(side_path.read_text())["sha256"]
    subprocess.run(cmd, check=True, capture_output=True)
    assert verify(out) == []


def test_slurm_array_tasks_then_finalize_equal_a_single_build(image_folder, tmp_path):
    src = ImageFolderSource(root=str(image_folder))
    size = ShardSizeConfig(maxcount=4)
    single = tmp_path / "single" / "s"
    run_build(single, src, shard=size)
    arr = tmp_path / "array" / "s"
    with pytest.raises(IncompleteBuild):
        run_build(arr, src, shard=size, stage="finalize")
    for task in range(3):
        assert run_build(arr, src, shard=size, stage="write", task_index=task, task_count=3) is None
    run_build(arr, src, shard=size, stage="finalize")
    assert _files(arr) == _files(single)


def test_rerun_skips_matching_shards_and_rebuilds_the_rest(image_folder, tmp_path, capsys):
    root = tmp_path / "s"
    run_build(root, ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(maxcount=5))
    before = _files(root)
    victim = root / "train-000001.tar"
    victim.write_bytes(b"garbage")
    stamp = {p.name: p.stat().st_mtime_ns for p in root.glob("*.tar")}
    written = []
    real = writer_mod.prepare
    run_build_counting = lambda: run_build(root, ImageFolderSource(root=str(image_folder)),  # noqa: E731
                                           shard=ShardSizeConfig(maxcount=5))
    writer_mod.prepare = lambda *a, **k: written.append(1) or real(*a, **k)
    try:
        run_build_counting()
    finally:
        writer_mod.prepare = real
    assert len(written) == 5  # only the damaged shard's 5 images were processed again
    assert _files(root) == before
    unchanged = {p.name: p.stat().st_mtime_ns for p in root.glob("*.tar") if p.name != victim.name}
    assert all(stamp[n] == t for n, t in unchanged.items())


def test_cli_demo_source_builds_shards_that_verify(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "shards.build", "source=demo",
                          f"source.root={tmp_path / 'digits'}", f"out={out}"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "5000 inputs = 5000 written + 0 quarantined" in res.stdout
    info = readers.manifest(out)
    assert info["classes"] == [str(d) for d in range(10)]
    assert sum(s["num_samples"] for s in info["splits"].values()) == 5000
    counts = collections.Counter(p.parent.name for p in (tmp_path / "digits").rglob("*.png"))
    assert sum(counts.values()) == 5000 and len(counts) == 10
    assert verify(out) == []


@pytest.mark.parametrize("override,key", [
    ("split.val=1.5", "split.val"),
    ("split.vall=0.1", "split.vall"),
    ("workers=abc", "workers"),
    ("shard.maxcount=0", "shard.maxcount"),
    ("source=imagefolder", "source.root"),
])
def test_cli_rejects_bad_settings_naming_the_key_before_any_work(tmp_path, override, key):
    out = tmp_path / "never"
    res = subprocess.run([sys.executable, "-m", "shards.build", f"out={out}", override],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode != 0
    assert key in res.stdout + res.stderr
    assert not list(out.glob("*.tar")) and not (out / "_info.json").exists()


def test_config_values_checked_in_python_api_too():
    with pytest.raises(ConfigError, match="task_index"):
        ShardConfig(source=ImageFolderSource(root="x"), out="y", task_index=3, task_count=2)
    with pytest.raises(ConfigError, match="split"):
        SplitConfig(val=0.6, test=0.5)


def test_build_returns_manifest_in_timm_layout(image_folder, tmp_path):
    info = build(ShardConfig(source=ImageFolderSource(root=str(image_folder)), out=str(tmp_path / "s")))
    for split in ("train", "val", "test"):
        s = info["splits"][split]
        assert s["name"] == split
        assert s["num_samples"] == sum(s["shard_lengths"])
        assert len(s["filenames"]) == len(s["shard_lengths"]) == len(s["shards"])
        for entry in s["shards"]:
            assert (tmp_path / "s" / entry["filename"]).stat().st_size == entry["bytes"]
    assert info["classes"] == ["ant", "bee", "cat"]
    assert (tmp_path / "s" / "classes.txt").read_text() == "ant\nbee\ncat\n"


def test_shard_sbatch_script_runs_array_tasks_then_finalize(image_folder, tmp_path):
    """Runs slurm/shard.sbatch as SLURM would run each array task (environment variables set)."""
    out = tmp_path / "arr" / "s"
    args = ["source=imagefolder", f"source.root={image_folder}", f"out={out}", "shard.maxcount=4"]
    env = os.environ | {"PYTHON": sys.executable, "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    for task_id in ("1", "2"):
        subprocess.run(["bash", str(REPO / "slurm" / "shard.sbatch"), *args], check=True, cwd=REPO,
                       env=env | {"SLURM_ARRAY_TASK_ID": task_id}, capture_output=True)
    assert not (out / "_info.json").exists()
    subprocess.run(["bash", str(REPO / "slurm" / "shard.sbatch"), "stage=finalize", *args], check=True,
                   cwd=REPO, env=os.environ | {"PYTHON": sys.executable}, capture_output=True)
    single = tmp_path / "one" / "s"
    run_build(single, ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(maxcount=4))
    assert _files(out) == _files(single)
