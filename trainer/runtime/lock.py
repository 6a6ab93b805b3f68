"""One writer per folder: an exclusive, non-blocking lock on `<folder>/.taxotrain.lock`.

Two runs on one run_dir delete each other's in-flight checkpoint temporaries and interleave their
metrics.jsonl lines; two evaluations into one folder mix their reports. So every tool that writes a
folder takes this lock first (rank 0 only in a DDP run), and a second writer is refused at once with
`FolderBusy` (exit 2), whose message names the holder: host, pid, SLURM job, tool, start time.

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` held by the kernel, not the file's existence: when the
holder dies, even by SIGKILL or OOM, its descriptors close and the lock is free at once; a leftover
file never blocks anyone and never needs deleting by hand. The file's JSON only describes the holder
(written after the lock is taken) for the refusal message. A clean release deletes the file, so a
finished run leaves none; the unlink happens while still locked, and `acquire` checks that the file
it locked is still the one at the path (else it retries), so two writers never hold two files.
Children forked by the holder (DataLoader or shard-writer workers) close their inherited copy of the
descriptor (`os.register_at_fork`): a lingering worker must not keep a dead holder's lock alive.

Shared file systems: on Linux, NFS emulates flock with byte-range locks on the server (NFSv4, or
NFSv3 with lockd), Lustre shares flock between clients when mounted with `-o flock`, and GPFS shares
it too, so the lock is usually cluster-coherent. A client node that crashes (rather than a process)
holds its locks until the server notices: the NFSv4 lease (often 90 s) or a Lustre eviction; the
same job requeued meanwhile waits for its predecessor's lock (`PREDECESSOR_WAIT_S`). A mount
that refuses locks (Lustre without `-o flock`, NFSv3 without lockd) makes flock fail: that is
`LockUnsupported` (exit 2) naming the folder and the mount, never a silent pass. Node-local
emulations (NFS `nolock`/`local_lock=all`, Lustre `-o localflock`) cannot be told apart from here:
there the lock only sees writers on the same node.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from trainer.runtime import distributed
from trainer.runtime.distributed import DistEnv
from trainer.runtime.exits import RunFailure, UsageError

log = logging.getLogger(__name__)
LOCK_NAME = ".taxotrain.lock"
# the holder writes its description just after taking the lock: a refused process waits this long for
# it rather than saying "unknown holder" when two start within the same millisecond
_DESCRIBE_WAIT_S = 1.0
_HELD: set[int] = set()  # descriptors of the locks this process holds
# A job requeued after its node failed can start before the shared file system drops the dead node's
# lock (an NFSv4 lease is often 90 s; Lustre waits for the client's eviction). Refusing it would end the
# run with exit 2, so a holder that is an earlier run of this very job is waited for, this long: below
# the default dist_timeout_s (300 s) that the other ranks wait with in `on_main`'s agreement.
PREDECESSOR_WAIT_S = 240.0
_POLL_S = 1.0


class FolderBusy(UsageError):
    """Another live process writes into the folder; the message names it."""


class LockUnsupported(UsageError):
    """The folder's file system refuses locks, or the lock file cannot be created there (read-only,
    permissions)."""


class LockFileFailure(RunFailure):
    """The storage failed to create the lock file (full, over quota, I/O error): the same command can
    be retried."""


_STORAGE_FAILED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
_FAILURES = (FolderBusy, LockUnsupported, LockFileFailure)  # what `acquire` raises, each rank alike


def _close_inherited() -> None:
    # a forked child shares the parent's open file description, and with it the flock: close the copy
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


class FolderLock:
    """The exclusive lock on `folder` (created if missing): `with FolderLock(d, "train"):` or
    `acquire()` ... `release()`. `active=False` gives an inert lock, for the ranks that do not write."""

    def __init__(self, folder: Path | str, tool: str, active: bool = True) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOCK_NAME
        self.tool, self.active = tool, active
        self._fd: int | None = None
        self._pid = 0
        self._made: list[Path] = []  # folders this lock created: removed again if left empty

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self) -> FolderLock:
        """Take the lock or raise `FolderBusy` / `LockUnsupported` at once (a requeued SLURM job waits
        up to `PREDECESSOR_WAIT_S` for its own previous run's lock); returns self."""
        if not self.active or self.held:
            return self
        self._made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        waiting_since = None
        while (fd := self._try_lock()) is None:
            found = holder(self.folder)
            if waiting_since is None and _is_predecessor(found):
                waiting_since = time.monotonic()
                log.warning("%s is still locked by this job's previous run (%s), on a node that may have "
                            "failed: waiting up to %.0f s for the file system to drop its lock",
                            self.folder, describe(found), PREDECESSOR_WAIT_S)
            if waiting_since is None or time.monotonic() - waiting_since > PREDECESSOR_WAIT_S:
                raise FolderBusy(self._busy_message(found))
            time.sleep(_POLL_S)
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(fd)
        self._describe_holder()
        return self

    def release(self) -> None:
        """Delete the file and unlock; safe to call twice, and a no-op in a forked child."""
        if not self.held:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        with contextlib.suppress(OSError):  # never fail a close path; a leftover file blocks nobody
            self.path.unlink()  # still locked: whoever opened the old file retries on a fresh one
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the last descriptor releases the flock
        for made in self._made:  # a tool that failed before writing leaves no empty folder behind
            with contextlib.suppress(OSError):  # not empty: the tool wrote there, keep it
                made.rmdir()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _try_lock(self) -> int | None:
        """A descriptor of the file at the path, locked; None while another process holds it."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as err:
                os.close(fd)
                raise LockUnsupported(_unsupported_message(self.folder, err)) from err
            if self._still_at_path(fd):
                return fd
            os.close(fd)  # its holder released and deleted it between our open and our flock

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            kind = LockFileFailure if err.errno in _STORAGE_FAILED else LockUnsupported
            raise kind(f"cannot create the lock file {self.path}: {err.strerror}") from err

    def _still_at_path(self, fd: int) -> bool:
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _describe_holder(self) -> None:
        job = distributed.slurm_job()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job.job_id if job else None,
                  "restarts": job.restarts if job else 0, "tool": self.tool,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        data = (json.dumps(record) + "\n").encode()
        try:  # in place, never through files.atomic_write: a rename would swap the locked inode
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)  # so a refused process on another NFS client reads it
        except OSError as err:  # the lock holds without it; only a refusal message loses its details
            log.warning("could not describe the holder in %s: %s", self.path, err)

    def _busy_message(self, found: dict | None) -> str:
        who = describe(found) if found else "a process that has not described itself yet"
        return (f"{self.folder} is in use by another taxotrain process ({who}; lock file {self.path}): "
                f"one writer per folder. Wait for it to finish, stop it, or use another folder")


def holder(folder: Path | str, wait_s: float = _DESCRIBE_WAIT_S) -> dict | None:
    """The description in `folder`'s lock file, waiting up to `wait_s` for a fresh holder to write
    it; None if there is none. It says who took the lock last, not whether it is still held."""
    path = Path(folder).expanduser() / LOCK_NAME
    deadline = time.monotonic() + wait_s
    while True:
        try:
            record = json.loads(path.read_text())
            if isinstance(record, dict):
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _is_predecessor(record: dict | None) -> bool:
    """Whether `record` describes an earlier run of this SLURM job (same id, fewer restarts)."""
    job = distributed.slurm_job()
    if job is None or record is None:
        return False
    restarts = record.get("restarts")
    return record.get("slurm_job") == job.job_id and isinstance(restarts, int) and restarts < job.restarts


def describe(record: dict) -> str:
    job = record.get("slurm_job")
    return (f"{record.get('tool', '?')} on host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
            f"{f'SLURM job {job}' if job else 'outside SLURM'}, since {record.get('since', '?')}")


def _unsupported_message(folder: Path, err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    return (f"cannot lock {folder}: its file system refuses file locks ({name}: {err.strerror}). "
            f"One writer per folder cannot be guaranteed there: mount Lustre with -o flock, make NFS "
            f"locking work (NFSv4, or lockd for NFSv3), or choose a folder on a file system with locks")


def on_main(folder: Path | str, tool: str, env: DistEnv | None = None) -> FolderLock:
    """The lock on `folder`, taken by rank 0 only (inert elsewhere) and returned held.

    Collective when a process group exists: every rank must call it, and all raise rank 0's error,
    so the others do not wait at their next collective until the timeout while rank 0 has left.
    """
    lock = FolderLock(folder, tool, active=distributed.is_main(env))
    failure: Exception | None = None
    try:
        lock.acquire()
    except _FAILURES as err:
        failure = err
    if distributed.initialized():
        kinds = _FAILURES
        mine = None if failure is None else (kinds.index(type(failure)), str(failure))
        verdict = distributed.gather(mine, everywhere=True)[0]
        if verdict is not None and failure is None:
            failure = kinds[verdict[0]](verdict[1])
    if failure is not None:
        raise failure  # only rank 0 can fail, and then it holds nothing
    return lock


@contextlib.contextmanager
def writing(folder: Path | str, tool: str, env: DistEnv | None = None) -> Iterator[FolderLock]:
    """`on_main` as a with-block: held by rank 0 for the body, released on every path."""
    lock = on_main(folder, tool, env)
    try:
        yield lock
    finally:
        lock.release()
