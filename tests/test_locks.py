"""One writer per folder (`trainer/runtime/lock.py`): refusal naming the holder, a dead holder's lock
taken at once, release; two real trainings on one run_dir; two shard builds into one folder."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_build, save_image
from test_train import SMALL, UNEVEN, cli, free_port
from train_fixtures import final_state, write_shardset

from shards.build import build
from shards.config import ImageFolderSource, ShardConfig, ShardSizeConfig
from trainer.runtime import distributed, lock
from trainer.runtime.distributed import DistEnv
from trainer.runtime.exits import EXIT_PREEMPTED, EXIT_USAGE, exit_code
from trainer.runtime.lock import LOCK_NAME, FolderBusy, FolderLock, LockUnsupported

# holds the lock on argv[1] until stdin closes; with "fork", first forks a child that outlives it
HOLDER = """
import os, sys, time
from trainer.runtime.lock import FolderLock
FolderLock(sys.argv[1], "holder").acquire()
if sys.argv[2:] == ["fork"]:
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
print("held", flush=True)
sys.stdin.read()
"""


def in_job(job: str, restarts: int) -> dict:
    """This environment as a process of SLURM job `job` (no array task) after `restarts` requeues."""
    plain = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY_")}
    return plain | {"SLURM_JOB_ID": job, "SLURM_RESTART_COUNT": str(restarts)}


def start_holder(folder: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), *extra], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    lines = []
    while not lines or lines[-1] != "held":
        line = proc.stdout.readline()
        assert line, f"the holder died: exit {proc.wait()}"
        lines.append(line.strip())
    return proc, lines


def lock_holder_pid(folder: Path, procs: list[subprocess.Popen], timeout: float = 120) -> int:
    """The pid in `folder`'s lock file as soon as one of `procs` has taken the lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(json.loads((folder / LOCK_NAME).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            if all(p.poll() is not None for p in procs):
                pytest.fail(f"nobody took the lock: exits {[p.returncode for p in procs]}")
            time.sleep(0.01)
    pytest.fail(f"no lock holder in {folder} after {timeout}s")


# ---------------------------------------------------------------- the lock itself


def test_a_second_writer_in_another_process_is_refused_naming_the_holder(tmp_path):
    proc, _ = start_holder(tmp_path, env=in_job("4242", 0))
    try:
        with pytest.raises(FolderBusy) as refused:
            FolderLock(tmp_path, "second").acquire()
        message = str(refused.value)
        assert str(tmp_path) in message and f"pid {proc.pid}" in message
        assert socket.gethostname() in message and "SLURM job 4242" in message and "holder" in message
        assert exit_code(refused.value) == EXIT_USAGE
    finally:
        proc.stdin.close()
        proc.wait()
    with FolderLock(tmp_path, "second") as mine:  # the holder exited: free
        assert mine.held
    assert not (tmp_path / LOCK_NAME).exists()  # a clean release leaves no file


def test_the_lock_of_a_sigkilled_holder_is_taken_at_once(tmp_path):
    proc, _ = start_holder(tmp_path)
    proc.kill()
    proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # the file stays behind ...
    started = time.monotonic()
    with FolderLock(tmp_path, "next"):  # ... and blocks nobody
        assert time.monotonic() - started < 0.5
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_forked_child_of_a_killed_holder_does_not_keep_the_lock(tmp_path):
    proc, lines = start_holder(tmp_path, "fork")
    child = int(lines[0])
    try:
        proc.kill()
        proc.wait()
        with FolderLock(tmp_path, "next"):
            os.kill(child, 0)  # the forked child still lives, yet the lock is free
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_requeued_job_waits_for_its_predecessors_lock_and_nobody_else_waits(tmp_path, monkeypatch):
    proc, _ = start_holder(tmp_path, env=in_job("77", 0))
    monkeypatch.setattr(lock, "_POLL_S", 0.05)
    monkeypatch.setattr(lock, "PREDECESSOR_WAIT_S", 0.3)
    for name in [n for n in os.environ if n.startswith("SLURM_ARRAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    try:  # another process of the same run of the job: refused at once
        started = time.monotonic()
        with pytest.raises(FolderBusy, match="SLURM job 77"):
            FolderLock(tmp_path, "train").acquire()
        assert time.monotonic() - started < 0.3 + lock._DESCRIBE_WAIT_S
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job requeued: waits, then gives up
        started = time.monotonic()
        with pytest.raises(FolderBusy):
            FolderLock(tmp_path, "train").acquire()
        assert time.monotonic() - started >= 0.3
        monkeypatch.setattr(lock, "PREDECESSOR_WAIT_S", 120)
        threading.Timer(0.5, proc.stdin.close).start()  # the predecessor's lock goes away meanwhile
        with FolderLock(tmp_path, "train") as mine:
            assert mine.held
    finally:
        proc.kill()
        proc.wait()


def test_release_frees_the_folder_and_a_second_lock_in_one_process_is_refused_too(tmp_path):
    first = FolderLock(tmp_path / "new", "first").acquire()  # creates the folder
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path / "new", "second").acquire()
    first.release()
    first.release()  # twice is fine
    with FolderLock(tmp_path / "new", "second") as second:
        assert second.held
    assert not second.held


def test_a_file_system_without_locks_fails_loudly_naming_the_folder(tmp_path, monkeypatch):
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", refuse)
    with pytest.raises(LockUnsupported, match="ENOLCK") as refused:
        FolderLock(tmp_path, "train").acquire()
    assert str(tmp_path) in str(refused.value) and "-o flock" in str(refused.value)
    assert exit_code(refused.value) == EXIT_USAGE


def test_only_rank_0_locks(tmp_path):
    other = lock.on_main(tmp_path, "train", DistEnv(1, 1, 2, 2, "127.0.0.1", 1, "torchrun"))
    assert not other.held and not (tmp_path / LOCK_NAME).exists()
    with lock.writing(tmp_path, "train", DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "single")) as main:
        assert main.held


def _rank_meets_busy_folder(rank: int, port: int, folder: str, holder_pid: int) -> None:
    env = DistEnv(rank, rank, 2, 2, "127.0.0.1", port, "torchrun")
    distributed.init(env, 30)
    try:
        lock.on_main(folder, "evaluate", env)
    except FolderBusy as err:
        sys.exit(3 if f"pid {holder_pid}" in str(err) else 4)
    finally:
        distributed.cleanup()
    sys.exit(0)


def test_every_rank_raises_when_rank_0_is_refused(tmp_path):
    port = free_port()
    with FolderLock(tmp_path, "holder"):
        spawn = multiprocessing.get_context("spawn")
        ranks = [spawn.Process(target=_rank_meets_busy_folder, args=(r, port, str(tmp_path), os.getpid()))
                 for r in range(2)]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(timeout=120)
    assert [p.exitcode for p in ranks] == [3, 3]  # rank 1 too, at once, not at its next collective


# ---------------------------------------------------------------- two trainings on one run_dir


def test_two_trainings_on_one_run_dir_one_trains_the_other_exits_2(tmp_path):
    shards = write_shardset(tmp_path / "shards", UNEVEN)
    run = tmp_path / "run"
    # the winner stops with a checkpoint at step 24, so the same command afterwards resumes it
    args = [f"data.shards={shards}", f"run_dir={run}", *SMALL, "loader.workers=0", "trainer.max_steps=40",
            "trainer.stop_at_step=24"]
    both = [subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    try:
        winner_pid = lock_holder_pid(run, both)
        # the winner waits while the other reaches the lock, however slowly this machine starts it
        os.kill(winner_pid, signal.SIGSTOP)
        winner, loser = both if both[0].pid == winner_pid else both[::-1]
        loser_out = loser.communicate(timeout=120)[0]
        os.kill(winner_pid, signal.SIGCONT)
        winner_out = winner.communicate(timeout=300)[0]
    finally:
        for p in both:
            p.kill()
    assert winner.returncode == EXIT_PREEMPTED, winner_out[-3000:]
    assert loser.returncode == EXIT_USAGE, loser_out[-3000:]
    assert f"{run} is in use by another taxotrain process" in loser_out
    assert f"train on host {socket.gethostname()}, pid {winner_pid}" in loser_out
    assert_no_duplicates(run, last_step=24)
    assert len(list((run / "provenance").glob("start-*.json"))) == 1  # the loser wrote nothing
    assert not (run / LOCK_NAME).exists()

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 24" in again.stdout + again.stderr
    assert final_state(run)["step"] == 40
    assert_no_duplicates(run, last_step=40)


def assert_no_duplicates(run: Path, last_step: int) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    keys = [(r["split"], r["step"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys))
    steps = [step for split, step in keys if split == "train"]
    assert steps == sorted(steps) and steps[-1] == last_step


# ---------------------------------------------------------------- shard builds


def test_two_shard_builds_into_one_folder_the_second_exits_2(tmp_path):
    src = tmp_path / "imgs"
    for i in range(60):
        save_image(src / f"c{i % 3}" / f"{i}.jpg", size=(64, 64), seed=i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shards.build", "source=imagefolder", f"source.root={src}", f"out={out}",
           "shard.maxcount=10"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert lock_holder_pid(out, [first]) == first.pid
        os.kill(first.pid, signal.SIGSTOP)  # holds the folder while the second one starts
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
    said = second.stdout + second.stderr
    assert second.returncode == EXIT_USAGE, said[-3000:]
    assert f"{out} is in use" in said and f"shards on host {socket.gethostname()}, pid {first.pid}" in said
    assert (out / "_info.json").exists() and not (out / LOCK_NAME).exists()


def test_finalize_locks_the_folder_and_array_writes_leave_each_others_temporaries(image_folder, tmp_path):
    src, size, out = ImageFolderSource(root=str(image_folder)), ShardSizeConfig(maxcount=4), tmp_path / "s"
    with FolderLock(out, "someone"), pytest.raises(FolderBusy):
        build(ShardConfig(source=src, out=str(out), shard=size, stage="finalize"))
    task = {"stage": "write", "task_count": 2, "shard": size}
    assert run_build(out, src, task_index=0, **task) is None
    assert run_build(tmp_path / "other", src, task_index=1, **task) is None
    own, sibling = sorted(out.glob("*.tar"))[0].name, sorted((tmp_path / "other").glob("*.tar"))[0].name
    stale, in_flight = out / f".{own}.tmp-1-dead", out / f".{sibling}.tmp-2-live"
    stale.touch()
    in_flight.touch()
    with FolderLock(out, "someone"):  # stage=write does not lock: array tasks share the folder
        assert run_build(out, src, task_index=0, **task) is None
    assert not stale.exists() and in_flight.exists()
    run_build(out, src, shard=size)  # stage=all, under the lock: every temporary is stale
    assert not in_flight.exists()
