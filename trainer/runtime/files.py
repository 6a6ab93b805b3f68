"""Atomic file writes and file digests: the one way taxotrain puts a file on disk.

A file is written under a hidden temporary name beside its final name (`.NAME.tmp-PID-RANDOM`),
fsynced, renamed over the final name with `os.replace` (atomic on POSIX), and the directory is
fsynced so the rename itself survives a crash. A reader therefore sees the old file or the new
one, never a part, and a killed writer leaves at most a temporary that its owner cleans up.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_INFIX = ".tmp-"  # every temporary is `.` + final name + TEMP_INFIX + pid-random


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TEMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}")


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
    """A temporary path to write `final` through: published on a clean exit, removed on any error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


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
