"""Atomic file writes and file digests: the one way taxotrain puts a file on disk.

A file is written under a hidden temporary name beside its final name (`.NAME.tmp-PID-RANDOM`),
fsynced, renamed over the final name with `os.replace` (atomic on POSIX), and the directory is
fsynced so the rename itself survives a crash. A reader therefore sees the old file or the new
one, never a part, and a killed writer leaves at most a temporary that its owner cleans up.

An OSError while writing (the temporary, its fsync, the rename, the directory) becomes a `WriteError`
that names the final path, the reason and the errno, with the temporary removed: `StorageFailure`
(exit 1) when the storage failed a correct command (full, over quota, I/O error: free space and the
same command continues), `StorageRefused` (exit 2) when the path cannot be written as given (read-only,
permission, not a directory): fix the command. OSErrors that name another file (a source the caller
reads inside `atomic_path`) pass through unchanged.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from trainer.runtime.exits import RunFailure, UsageError

TEMP_INFIX = ".tmp-"  # every temporary is `.` + final name + TEMP_INFIX + pid-random


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TEMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}")


# Retrying cannot help with these: the path or its permissions must change (exit 2, not 1).
_REFUSED = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG,
                      errno.ELOOP})
_HINTS = {errno.ENOSPC: "the filesystem is full: free space, then rerun (a training run continues)",
          errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota, then rerun",
          errno.EIO: "the storage reported an I/O error", errno.EROFS: "choose a writable location",
          errno.EACCES: "check the permissions of the directory", errno.EPERM: "check the permissions"}


class WriteError(OSError):
    """Writing `final` failed; `filename` is the final path (not the temporary), `errno` the cause's."""

    def __init__(self, final: Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(final))

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno, str(self.errno)) if self.errno else "no errno"
        hint = _HINTS.get(self.errno)
        return f"cannot write {self.filename}: {self.strerror} ({code})" + (f"; {hint}" if hint else "")


class StorageFailure(WriteError, RunFailure):
    """The storage failed a write (ENOSPC, EDQUOT, EIO, ...): exit 1, the same command can be retried."""


class StorageRefused(WriteError, UsageError):
    """The path cannot be written as given (EROFS, EACCES, EPERM, ENOTDIR, ...): exit 2."""


def write_error(final: Path, cause: OSError) -> WriteError:
    """The WriteError subclass that `cause` (an OSError while writing `final`) deserves."""
    kind = StorageRefused if cause.errno in _REFUSED else StorageFailure
    return kind(final, cause)


def _concerns(err: OSError, tmp: Path, final: Path) -> bool:
    """Whether `err` came from writing `final` (its temporary, the rename, a parent) and not another file."""
    if isinstance(err, WriteError):
        return False  # already translated (a nested atomic write)
    return err.filename is None or str(err.filename) in {str(p) for p in (tmp, final, *final.parents)}


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some network/FUSE filesystems refuse fsync on a directory; the rename is then as durable as
        # that filesystem makes it, which is all we can get there.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path to write `final` through: published on a clean exit, removed on any error.

    An OSError about the temporary, the rename or a parent directory is raised as a `WriteError`
    naming `final`."""
    final = Path(final)
    tmp = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        if not _concerns(e, tmp, final):
            raise
        raise write_error(final, e) from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # never hide the write's own error; a stale temporary is removed by its owner's next save


def atomic_write(final: Path, data: bytes | memoryview | str) -> str:
    """Write `data` (text as UTF-8) to `final` atomically; returns the sha256 of the bytes written."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(final) as tmp, open(tmp, "xb") as fh:
        fh.write(payload)
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ reading what a user or a shard names

_KINDS = {"p": "FIFO", "d": "directory", "c": "character device", "b": "block device", "s": "socket"}


class SpecialFile(ValueError):
    """Not a regular file (a FIFO, a device, a socket, a directory): `kind` says which. Opening a FIFO
    blocks until a writer appears, i.e. forever, and /dev/zero behind an image name would be read until
    memory runs out, so such paths are refused before any read."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(f"{path}: is a {kind}, not a regular file")
        self.path, self.kind = path, kind


class TooLarge(ValueError):
    """A regular file over the caller's limit; `size` is None when it grew past it while being read."""

    def __init__(self, path: Path, size: int | None, limit: int) -> None:
        grew = f"grew past {limit:,} bytes while read"
        self.reason = f"file too large: {f'{size:,} bytes > limit {limit:,}' if size is not None else grew}"
        super().__init__(f"{path}: {self.reason}")
        self.path, self.size, self.limit = path, size, limit


def _refuse_special(path: Path, st: os.stat_result, limit: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SpecialFile(path, _KINDS.get(stat.filemode(st.st_mode)[0], "special file"))
    if limit is not None and st.st_size > limit:
        raise TooLarge(path, st.st_size, limit)


@contextmanager
def open_regular(path: Path, limit: int | None = None) -> Iterator[BinaryIO]:
    """`path` opened for reading if it is a regular file (of at most `limit` bytes); `SpecialFile` or
    `TooLarge` otherwise. `stat` (following symlinks) before the open, then an O_NONBLOCK open and an
    `fstat` of the descriptor, which also catches a path swapped between the two. OSErrors pass through."""
    _refuse_special(Path(path), os.stat(path), limit)
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as fh:
        _refuse_special(Path(path), os.fstat(fh.fileno()), limit)
        yield fh


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file (see `open_regular`); one that grows past `limit` while read is
    refused too."""
    with open_regular(path, limit) as fh:
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise TooLarge(Path(path), None, limit)
    return data
