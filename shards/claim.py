"""One build per output folder, across the tasks of a SLURM array: `_building.json`.

The folder lock (`trainer/runtime/lock.py`) cannot do this alone: the tasks of one array write into one
folder at the same time by design, so stage=write holds no lock for its whole run. Instead each task,
and stage=all, claims the folder for its build, the digest of every setting that shapes the shards:
the first one writes the claim, the tasks of the same build find their own, and a task of any other
build is refused, naming the claim's holder. The final step removes the claim once the manifest is
written, so a finished set may be rebuilt with other settings; a build that died keeps it, and a rerun
of that same build goes on.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from shards.config import ShardConfig
from trainer.runtime import distributed
from trainer.runtime.exits import UsageError
from trainer.runtime.files import atomic_write
from trainer.runtime.lock import FolderBusy, FolderLock, describe

CLAIM = "_building.json"
# the claim is read and written under a lock of its own, held for milliseconds: tasks that start
# together wait for each other this long at most
_WAIT_S = 60.0


class BuildConflict(UsageError):
    """Another build (other settings) is writing, or died writing, into the same folder."""


def settings(cfg: ShardConfig) -> dict:
    """Every setting that decides which shards exist and what they hold (not workers or progress)."""
    found = {"source": asdict(cfg.source), "seed": cfg.seed, "split": asdict(cfg.split),
             "shard": asdict(cfg.shard), "resize": asdict(cfg.resize), "max_pixels": cfg.max_pixels,
             "partition": cfg.partition, "increment": cfg.increment}
    if cfg.partition:  # each task lists its share by task_count: another count, other shards
        found["task_count"] = cfg.task_count
    return json.loads(json.dumps(found))


def build_id(cfg: ShardConfig) -> str:
    return hashlib.sha256(json.dumps(settings(cfg), sort_keys=True).encode()).hexdigest()[:16]


def claim(out: Path, cfg: ShardConfig) -> str:
    """Claim `out` for `cfg`'s build (or find this build's own claim); returns the build id."""
    mine = build_id(cfg)
    deadline = time.monotonic() + _WAIT_S
    while True:
        try:
            with FolderLock(out / ".claim", "shards claim"):
                _check_or_write(out / CLAIM, mine, cfg)
                return mine
        except FolderBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _check_or_write(path: Path, mine: str, cfg: ShardConfig) -> None:
    found = _read(path)
    if found is None:
        job = distributed.slurm_job()
        record = {"build": mine, "settings": settings(cfg), "tool": "shards", "host": socket.gethostname(),
                  "pid": os.getpid(), "slurm_job": job.job_id if job else None,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write(path, json.dumps(record, indent=1).encode())
    elif found.get("build") != mine:
        raise BuildConflict(_conflict(path, found, settings(cfg)))


def _read(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise BuildConflict(f"{path}: unreadable build claim ({err}); if no build is running into "
                            f"{path.parent}, delete it") from None
    return found if isinstance(found, dict) else {}


def _conflict(path: Path, found: dict, wanted: dict) -> str:
    theirs = found.get("settings") or {}
    differ = sorted(k for k in set(theirs) | set(wanted) if theirs.get(k) != wanted.get(k))
    return (f"{path.parent} is being built by another build ({describe(found)}) whose settings differ in "
            f"{', '.join(differ) or 'nothing recorded'}: two builds into one folder would mix their "
            f"shards. Wait for it to finish (its stage=finalize releases the folder), use another out, "
            f"or, if that build was abandoned, delete {path}")


def release(out: Path, mine: str) -> None:
    """After the manifest: the folder is a finished set, free for another build."""
    found = _read(out / CLAIM)
    if found is not None and found.get("build") == mine:
        (out / CLAIM).unlink(missing_ok=True)
