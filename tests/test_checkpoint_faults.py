"""Checkpoints under faults (issue 14): a best update cut short at every step, a full or read-only disk
(a real tmpfs), FIFOs named like checkpoint files, and a training run SIGKILLed ten times that still ends
bit-identical to an uninterrupted one."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from train_fixtures import assert_same_training_state, final_state, write_shardset

from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.runtime.exits import RunFailure, UsageError, exit_code
from trainer.runtime.files import TEMP_INFIX, atomic_path, atomic_write

REPO = Path(__file__).resolve().parents[1]
METRICS = {1: 0.5, 2: 0.9, 3: 0.95}


def state(step: int, n: int = 16) -> dict:
    return {"step": step, "w": torch.full((n,), float(step))}


def temporaries(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if TEMP_INFIX in n]


def marker(directory: Path, name: str = "best") -> dict:
    return json.loads((directory / f"{name}.done").read_text())


def assert_settled_best(directory: Path, step: int) -> None:
    """A rerun's view: best.pt loads as `step`, best.done vouches for it alone, best.json agrees."""
    ck = Checkpointer(directory)
    assert ck.best == {"step": step, "metric": METRICS[step], "higher_is_better": True}
    assert Checkpointer.load(directory / "best.pt")["step"] == step
    assert "previous" not in marker(directory) and marker(directory)["step"] == step
    assert json.loads((directory / "best.json").read_text())["step"] == step


# ---------------------------------------------------------------- a best update cut short anywhere


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs but `finally` blocks (which a kill skips too)."""


@pytest.mark.parametrize("cut", range(7))
def test_best_stays_loadable_wherever_an_update_is_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       cut: int) -> None:
    # save(2) renames six files: step-2.pt, step-2.done, then best.done (vouching for old and new),
    # best.pt, best.json, best.done. `cut` stops it before rename number `cut` (6: not at all).
    Checkpointer(tmp_path).save(state(1), 1, metric=METRICS[1])
    renames, real_replace = [], os.replace

    def replace(src, dst):
        if len(renames) == cut:
            raise Killed
        renames.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        Checkpointer(tmp_path).save(state(2), 2, metric=METRICS[2])
    except Killed:
        pass
    monkeypatch.undo()
    # Read-only, as evaluate/predict/export open it: the old or the new best, never neither.
    holds = 2 if "best.pt" in renames else 1
    assert Checkpointer.load(tmp_path / "best.pt")["step"] == holds, renames
    assert_settled_best(tmp_path, holds)  # a rerun settles the marker and best.json
    again = Checkpointer(tmp_path)
    again.save(state(3), 3, metric=METRICS[3])
    assert_settled_best(tmp_path, 3)


def test_best_lost_by_an_older_version_is_repaired_from_the_step_marker(tmp_path: Path) -> None:
    # What issue 14 found: best.done deleted by an interrupted update, best.json without sha256.
    ck = Checkpointer(tmp_path, keep_last=5)
    ck.save(state(1), 1, metric=METRICS[1])
    (tmp_path / "best.done").unlink()
    (tmp_path / "best.json").write_text(json.dumps({"step": 1, "metric": 0.5, "higher_is_better": True}))
    # best.pt is a byte copy of step-1.pt, whose marker records the sha256: loadable without writing
    assert Checkpointer.load(tmp_path / "best.pt")["step"] == 1
    assert not (tmp_path / "best.done").exists()
    assert_settled_best(tmp_path, 1)  # and a rerun rewrites the marker


# ---------------------------------------------------------------- full and read-only disks


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small filesystem at `path`; root is available in CI, so a failed mount fails there."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        why = f"cannot mount a tmpfs at {path}: {done.stderr.strip() or done.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `directory`'s filesystem."""
    fs = os.statvfs(directory)
    filler = directory.parent / "filler"
    filler.write_bytes(b"\0" * max(0, fs.f_bavail * fs.f_frsize - leave))
    return filler


BIG = 100_000  # floats: a 400 kB checkpoint


def no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a filesystem without hard links (FAT, some FUSE mounts): best.pt is then a byte copy."""
    def refuse(src: Path, dst: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr(os, "link", refuse)


def test_enospc_during_best_update_names_the_path_and_keeps_the_old_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_hard_links(monkeypatch)  # a hard link needs no room: only a copy can meet a full disk
    with tmpfs(tmp_path / "fs", "4m") as fs:
        directory = fs / "ck"
        ck = Checkpointer(directory, keep_last=2)
        ck.save(state(1, BIG), 1, metric=METRICS[1])
        size = (directory / "step-000000001.pt").stat().st_size
        filler = fill(directory, leave=size + 64 * 1024)  # room for step-2 and its marker, not best.pt
        with pytest.raises(OSError) as raised:
            ck.save(state(2, BIG), 2, metric=METRICS[2])
        err = raised.value
        assert isinstance(err, RunFailure) and exit_code(err) == 1, repr(err)
        assert str(directory / "best.pt") in str(err) and "ENOSPC" in str(err)
        assert temporaries(directory) == []
        assert Checkpointer.load(directory / "best.pt")["step"] == 1  # the old best still loads
        assert Checkpointer.load(directory / "step-000000002.pt")["step"] == 2  # and the progress is kept
        filler.unlink()
        assert_settled_best(directory, 1)  # a later run with space settles best.done
        rerun = Checkpointer(directory, keep_last=2)
        rerun.save(state(3, BIG), 3, metric=METRICS[3])
        assert_settled_best(directory, 3)


def test_best_update_is_a_hard_link_that_fits_where_a_copy_would_not(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "4m") as fs:
        directory = fs / "ck"
        ck = Checkpointer(directory, keep_last=2)
        ck.save(state(1, BIG), 1, metric=METRICS[1])
        size = (directory / "step-000000001.pt").stat().st_size
        fill(directory, leave=size + 64 * 1024)  # room for step-2 and its marker, not a copy of it
        ck.save(state(2, BIG), 2, metric=METRICS[2])
        best, step = directory / "best.pt", directory / "step-000000002.pt"
        assert best.stat().st_ino == step.stat().st_ino and temporaries(directory) == []
        assert_settled_best(directory, 2)


def test_enospc_during_a_step_checkpoint(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "4m") as fs:
        directory = fs / "ck"
        ck = Checkpointer(directory, keep_last=2)
        ck.save(state(1, BIG), 1, metric=METRICS[1])
        fill(directory, leave=64 * 1024)
        with pytest.raises(OSError, match="step-000000002.pt.*No space left") as raised:
            ck.save(state(2, BIG), 2, metric=METRICS[2])
        assert isinstance(raised.value, RunFailure) and temporaries(directory) == []
        assert ck.load_latest()["step"] == 1 and Checkpointer(directory).best["step"] == 1


def test_read_only_filesystem_is_a_usage_error_naming_the_path(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "1m") as fs:
        Checkpointer(fs / "ck").save(state(1), 1)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        with pytest.raises(OSError) as raised:
            Checkpointer(fs / "ck").save(state(2), 2)
        err = raised.value
        assert isinstance(err, UsageError) and exit_code(err) == 2, repr(err)
        assert str(fs / "ck" / "step-000000002.pt") in str(err) and "EROFS" in str(err)


def test_other_files_errors_pass_through_and_io_errors_are_run_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError) as raised, atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"partial")
        (tmp_path / "no-such-input").read_bytes()  # the caller's own read, not the write
    assert type(raised.value) is FileNotFoundError and not os.listdir(tmp_path)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(RunFailure, match=r"cannot write .*out.bin: Input/output error \(EIO\)"):
        atomic_write(tmp_path / "out.bin", b"data")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- FIFOs named like checkpoint files


@contextmanager
def must_not_block(*fifos: Path, after: float = 3.0) -> Iterator[None]:
    """Fail, rather than hang, if the body blocks opening one of `fifos`: a watchdog opens their write
    ends (which only succeeds while a reader waits), so the reader sees end of file and goes on."""
    blocked: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(after):
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    continue  # no reader waiting
                blocked.append(fifo.name)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        stop.set()
        watchdog.join()
    assert not blocked, f"blocked opening {blocked}"


def make_fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("suffix", ["pt", "done"])
def test_fifo_step_file_is_skipped_on_resume_and_refused_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, suffix: str
) -> None:
    ck = Checkpointer(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        ck.save(state(step), step)
    fifo = make_fifo(tmp_path / f"step-000000003.{suffix}")
    with must_not_block(fifo):
        assert ck.latest() == tmp_path / "step-000000002.pt"
        path, loaded = Checkpointer(tmp_path, keep_last=5).load_newest()
        assert path == tmp_path / "step-000000002.pt" and loaded["step"] == 2
        with pytest.raises(CheckpointError, match=f"{fifo}: is a FIFO"):
            Checkpointer.load(tmp_path / "step-000000003.pt")
        ck.save(state(3), 3)  # the resumed run writes step 3 again, over the FIFO
    assert Checkpointer(tmp_path).load_latest()["step"] == 3


@pytest.mark.parametrize("name", ["best.pt", "best.done", "best.json"])
def test_fifo_best_file_does_not_block(tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str) -> None:
    Checkpointer(tmp_path, keep_last=5).save(state(1), 1, metric=METRICS[1])
    fifo = make_fifo(tmp_path / name)
    with must_not_block(fifo):
        reader = Checkpointer(tmp_path, is_main=False)  # as evaluate opens a run directory
        assert f"{fifo}: is a FIFO" in caplog.text
        if name == "best.pt":
            assert reader.best is None
            with pytest.raises(CheckpointError, match=f"{fifo}: is a FIFO"):
                Checkpointer.load(fifo)
        else:
            # best.pt is still proven whole by the other witnesses (best.json, best.done, step-1.done)
            assert Checkpointer.load(tmp_path / "best.pt")["step"] == 1
        Checkpointer(tmp_path, keep_last=5).save(state(2), 2, metric=METRICS[2])
    assert_settled_best(tmp_path, 2)


def test_fifo_marker_is_refused_by_name(tmp_path: Path) -> None:
    Checkpointer(tmp_path).save(state(1), 1)
    fifo = make_fifo(tmp_path / "step-000000001.done")
    with must_not_block(fifo), pytest.raises(CheckpointError, match=f"{fifo}: is a FIFO"):
        Checkpointer.load(tmp_path / "step-000000001.pt")


# ---------------------------------------------------------------- ten SIGKILLs, then bit-identical

# batch 16 over 129 samples: 8 steps an epoch, so three validations and best updates in 24 steps
KILLED_RUN = ["model.name=mobilenet_v3_small", "data.crop_size=16", "data.scale=[0.5,1.0]",
              "loader.batch_size=16", "optim.base_lr=0.05", "schedule.warmup_epochs=0.5",
              "logger.mode=disabled", "trainer.log_every=4", "loader.pin_memory=false", "loader.workers=0",
              "data.check=size", "trainer.max_steps=24", "trainer.checkpoint_every=1", "trainer.keep_last=2"]


def start_training(shards: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "launch.train", f"data.shards={shards}",
                                 f"run_dir={run_dir}", *KILLED_RUN], cwd=REPO, stdout=out, stderr=out)


def newest_marked(run_dir: Path) -> int:
    names = os.listdir(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
    return max((int(n[5:14]) for n in names if n.startswith("step-") and n.endswith(".done")), default=-1)


def kill_once(proc: subprocess.Popen, run_dir: Path, rnd: random.Random, log: Path) -> bool:
    """SIGKILL `proc` at a random moment of the step after its first new checkpoint; True if that was
    in the middle of a write. At most two steps a round, so ten rounds end well before the last step."""
    start, deadline = newest_marked(run_dir), time.monotonic() + 120
    while (reached := newest_marked(run_dir)) <= start:
        assert proc.poll() is None, f"finished or failed before it was killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no new checkpoint within 120 s"
        time.sleep(0.01)
    # after a random delay; half the time, also wait for one of the run's temporaries (aim at a write)
    delay, aim, t0 = rnd.uniform(0.0, 0.5), rnd.random() < 0.5, time.monotonic()
    while newest_marked(run_dir) == reached and time.monotonic() < t0 + 30:
        if time.monotonic() - t0 >= delay and (not aim or temporaries(run_dir / "checkpoints")):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return bool(temporaries(run_dir / "checkpoints"))


def test_ten_sigkills_then_resume_is_bitwise_equal_to_uninterrupted(tmp_path: Path) -> None:
    shards = write_shardset(tmp_path / "shards", {"train": [37, 5, 22, 3, 30, 11, 2, 19], "val": [13, 4, 9]})
    whole_log, killed_log = tmp_path / "whole.log", tmp_path / "killed.log"
    whole = start_training(shards, tmp_path / "whole", whole_log)  # alongside the kills: 2 cores
    rnd, mid_write = random.Random(14), 0
    try:
        for _ in range(10):
            proc = start_training(shards, tmp_path / "killed", killed_log)
            try:
                mid_write += kill_once(proc, tmp_path / "killed", rnd, killed_log)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        last = start_training(shards, tmp_path / "killed", killed_log)
        assert last.wait(timeout=300) == 0, killed_log.read_text()[-3000:]
        assert whole.wait(timeout=300) == 0, whole_log.read_text()[-3000:]
    finally:
        if whole.poll() is None:
            whole.kill()
            whole.wait()
    assert mid_write >= 1, "no kill landed in the middle of a checkpoint write"
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "killed")
    assert a["step"] == 24
    assert_same_training_state(a, b)
    best_a = Checkpointer.load(tmp_path / "whole" / "checkpoints" / "best.pt")
    best_b = Checkpointer.load(tmp_path / "killed" / "checkpoints" / "best.pt")
    assert_same_training_state(best_a, best_b)
    assert Checkpointer(tmp_path / "killed" / "checkpoints").best == Checkpointer(
        tmp_path / "whole" / "checkpoints").best
