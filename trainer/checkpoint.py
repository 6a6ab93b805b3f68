"""Atomic, verifiable checkpoints with last-k retention, a best copy, and resume from the newest good one.

Layout of `directory` (one writer per directory: the main rank of one job):
    step-000001000.pt    torch.save of the whole training state
    step-000001000.done  completeness marker, JSON {step, bytes, sha256, time}
    best.pt / best.done  copy of the state that scored the best metric, same marker scheme
    best.json            {step, metric, higher_is_better}: what best.pt holds; survives restarts

Every file is written through `trainer.runtime.files.atomic_write` (temporary name, fsync, rename,
directory fsync). The marker is written only after its .pt is in place, so a process killed at any
moment leaves either a complete pair or a .pt without a valid marker, which is never loaded. Size and
sha256 in the marker also catch truncation and bit rot that happen after the save.

`latest()` only checks that the marker exists and the size agrees (cheap: no read of the data);
`load()` checks the sha256 as well, and `load_latest()` walks back past corrupt checkpoints with a warning.
Everything loads with `torch.load(weights_only=True)`, so the state must consist of tensors and plain
Python containers/scalars (see trainer/rng.py and the LambdaLR note in trainer/schedule.py); the first
`save()` of each Checkpointer proves this by loading the bytes back, so a bad state fails at the first
save rather than at resume time.

`save()` does no collectives: the caller puts a barrier after it before any rank reads the directory.
What a training state holds, and its format version, is `trainer/state.py`'s business: this module
stores and verifies any such dict.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import operator
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from trainer.runtime.exits import UsageError
from trainer.runtime.files import atomic_write

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"step-(\d+)\.(pt|done)")
# Only our own temporaries (`.{final name}.tmp-{pid}-{random}`), never other files a user keeps here.
_TEMP_FILE = re.compile(r"\.(?:step-\d+|best)\.(?:pt|done|json)\.tmp-")
_BEST = "best"


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not load with weights_only=True."""


def _marker_path(pt: Path) -> Path:
    return pt.with_suffix(".done")


def _read_marker(pt: Path) -> dict[str, Any]:
    """The parsed, type-checked marker of `pt`; CheckpointError if it is missing or malformed."""
    marker = _marker_path(pt)
    try:
        m = json.loads(marker.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{pt}: no completeness marker {marker.name} (interrupted save?)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{pt}: unreadable marker {marker.name}: {e}") from e
    ok = (isinstance(m, dict) and isinstance(m.get("step"), int) and isinstance(m.get("bytes"), int)
          and isinstance(m.get("sha256"), str))
    if not ok:
        raise CheckpointError(f"{pt}: malformed marker {marker.name}: {m!r}")
    return m


def _write_marked(pt: Path, data: memoryview, step: int, between: dict[Path, bytes] | None = None) -> None:
    """Write `pt` and then its marker; `between` files are written after the data, before the marker."""
    # Drop the old marker first: while the data is replaced the pair then reads as incomplete, never as
    # a marker describing other bytes (matters when a step or best.pt is overwritten).
    _marker_path(pt).unlink(missing_ok=True)
    digest = atomic_write(pt, data)
    for path, content in (between or {}).items():
        atomic_write(path, content)
    marker = {"step": step, "bytes": len(data), "sha256": digest,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write(_marker_path(pt), json.dumps(marker))


def _check_step(step: int) -> int:
    if isinstance(step, bool):
        raise TypeError("step must be an int, got bool")
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


class Checkpointer:
    """Saves `step-*.pt` checkpoints into `directory`, keeping the newest `keep_last` plus a best copy.

    Only `is_main` writes; every rank may call `latest()` / `load_latest()` (after the caller's barrier).
    """

    def __init__(self, directory: Path, keep_last: int = 3, is_main: bool = True) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.is_main = is_main
        self._verified = False
        if is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._best = self._read_best()

    # ------------------------------------------------------------------ paths and scanning

    def _step_path(self, step: int) -> Path:
        return self.directory / f"step-{step:09d}.pt"

    def _scan(self) -> dict[int, set[str]]:
        """step -> the suffixes ("pt", "done") present for it."""
        found: dict[int, set[str]] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return found
        for name in names:
            if m := _STEP_FILE.fullmatch(name):
                found.setdefault(int(m[1]), set()).add(m[2])
        return found

    def _complete(self, step: int) -> bool:
        """Cheap validity: marker parses, names this step, and the .pt has the recorded size."""
        pt = self._step_path(step)
        try:
            marker = _read_marker(pt)
            return marker["step"] == step and pt.stat().st_size == marker["bytes"]
        except (CheckpointError, OSError):
            return False

    def _complete_steps(self) -> list[int]:
        """Cheaply valid steps, newest first."""
        return sorted((s for s in self._scan() if self._complete(s)), reverse=True)

    # ------------------------------------------------------------------ best

    @property
    def best(self) -> dict[str, Any] | None:
        """{step, metric, higher_is_better} of best.pt, or None if there is no (consistent) best yet."""
        return dict(self._best) if self._best is not None else None

    def _read_best(self) -> dict[str, Any] | None:
        path = self.directory / f"{_BEST}.json"
        try:
            best = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s (%s): the next metric becomes the best", path, e)
            return None
        ok = (isinstance(best, dict) and isinstance(best.get("step"), int)
              and isinstance(best.get("metric"), (int, float))
              and isinstance(best.get("higher_is_better"), bool))
        if not ok:
            log.warning("ignoring malformed %s (%r): the next metric becomes the best", path, best)
            return None
        pt = self.directory / f"{_BEST}.pt"
        try:
            marker_step = _read_marker(pt)["step"]
        except CheckpointError as e:
            # best.done is removed before best.pt is rewritten and restored last, so this means an
            # update was interrupted and best.pt may not be what best.json describes.
            log.warning("best checkpoint is incomplete (%s): the next metric becomes the best", e)
            return None
        if marker_step != best.get("step"):
            log.warning("%s names step %s but %s holds step %s: the next metric becomes the best",
                        path.name, best.get("step"), pt.name, marker_step)
            return None
        return best

    def _improves(self, metric: float, higher_is_better: bool) -> bool:
        if math.isnan(metric):
            log.warning("metric is NaN: not a candidate for the best checkpoint")
            return False
        if self._best is None:
            return True
        if self._best["higher_is_better"] != higher_is_better:
            # The stored best was ranked the other way round; comparing would keep a meaningless "best".
            raise ValueError(f"higher_is_better={higher_is_better} but {self.directory / 'best.json'} "
                             f"was recorded with higher_is_better={self._best['higher_is_better']}")
        stored = self._best["metric"]
        return metric > stored if higher_is_better else metric < stored

    def _save_best(self, data: memoryview, step: int, metric: float, higher_is_better: bool) -> None:
        best = {"step": step, "metric": metric, "higher_is_better": higher_is_better}
        # best.json goes between data and marker: a kill anywhere before the marker leaves best.done
        # missing, which the next Checkpointer detects (see _read_best) instead of trusting a stale pair.
        _write_marked(self.directory / f"{_BEST}.pt", data, step,
                      between={self.directory / f"{_BEST}.json": json.dumps(best).encode()})
        self._best = best

    # ------------------------------------------------------------------ saving

    def _serialize(self, state: dict[str, Any]) -> memoryview:
        # Serialising to memory first lets us hash the exact bytes written and reuse them for best.pt, at the
        # cost of one extra in-memory copy of the checkpoint (fine for image classifiers, not for LLMs).
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getbuffer()
        if not self._verified:
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"state does not load with torch.load(weights_only=True), so it could "
                                      f"not be resumed from; not saved: {e}") from e
            self._verified = True
        return data

    def save(
        self, state: dict[str, Any], step: int, metric: float | None = None, higher_is_better: bool = True
    ) -> Path | None:
        """Write `state` as checkpoint `step`, and as best.pt if `metric` improves; None off the main rank."""
        if not self.is_main:
            return None
        step = _check_step(step)
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        metric = None if metric is None else float(metric)
        data = self._serialize(state)
        newer = [s for s in self._complete_steps() if s > step]
        if newer:
            log.warning("saving step %d while newer checkpoints exist (steps %s): auto-resume prefers those; "
                        "remove them if this run rolled back on purpose", step, newer)
        path = self._step_path(step)
        _write_marked(path, data, step)
        self._prune(step)
        # Last, so that a ValueError from a changed higher_is_better cannot cost the step checkpoint.
        if metric is not None and self._improves(metric, higher_is_better):
            self._save_best(data, step, metric, higher_is_better)
        return path

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            # A failed cleanup wastes disk but must not end a run whose checkpoint was saved.
            log.warning("could not delete %s: %s", path, e)

    def _prune(self, just_written: int) -> None:
        scan = self._scan()
        complete = sorted((s for s in scan if self._complete(s)), reverse=True)
        keep = set(complete[: self.keep_last]) | {just_written}
        for step in sorted(scan):
            # Incomplete leftovers older than this save can never become complete; newer ones are
            # someone else's business (see the warning in save()), so they are left alone.
            if step not in keep and (step in complete or step < just_written):
                pt = self._step_path(step)
                # Marker first: a kill in between leaves an unmarked .pt, which is ignored, never a
                # marker without data.
                self._unlink(_marker_path(pt))
                self._unlink(pt)
        # With one writer per directory, any temporary still here was left by a killed process: ours
        # are renamed or removed before atomic_write returns.
        for name in os.listdir(self.directory):
            if _TEMP_FILE.match(name):
                log.info("removing stale temporary %s", name)
                self._unlink(self.directory / name)

    # ------------------------------------------------------------------ loading

    def latest(self) -> Path | None:
        """The newest checkpoint whose marker exists and whose size matches (sha256 is checked on load)."""
        complete = self._complete_steps()
        return self._step_path(complete[0]) if complete else None

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        """Verified load of one checkpoint onto the CPU; CheckpointError naming `path` on any problem."""
        path = Path(path)
        marker = _read_marker(path)
        # The whole file is read once for hashing and unpickling: peak memory is file size + tensors.
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e}") from e
        if len(data) != marker["bytes"]:
            raise CheckpointError(f"{path}: {len(data)} bytes but the marker records {marker['bytes']} "
                                  f"(truncated or overwritten)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != marker["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest} does not match the marker's {marker['sha256']} "
                                  f"(corrupted)")
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict, got {type(state).__name__}")
        return state

    def load_latest(self) -> dict[str, Any] | None:
        """The state of `load_newest()`, without its path."""
        found = self.load_newest()
        return None if found is None else found[1]

    def load_newest(self) -> tuple[Path, dict[str, Any]] | None:
        """(path, state) of the newest checkpoint that loads, walking back past corrupt ones with a warning.

        None only if no checkpoint has a marker at all (a fresh run, or one killed during its first
        save); CheckpointError if marked checkpoints exist but none loads, because silently starting
        from scratch would throw the run's progress away. `trainer.state.TrainingState.read_latest`
        turns the state into a checked record.
        """
        scan = self._scan()
        unmarked = sorted(s for s, kinds in scan.items() if "done" not in kinds)
        if unmarked:
            log.warning("ignoring checkpoint(s) without completeness marker (interrupted save?): %s",
                        ", ".join(self._step_path(s).name for s in unmarked))
        failed: list[str] = []
        for step in sorted((s for s, kinds in scan.items() if "done" in kinds), reverse=True):
            path = self._step_path(step)
            try:
                state = self.load(path)
            except CheckpointError as e:
                log.warning("skipping unusable checkpoint %s: %s", path, e)
                failed.append(path.name)
                continue
            log.info("loading %s", path)
            return path, state
        if failed:
            raise CheckpointError(f"no checkpoint in {self.directory} loads; tried (newest first): "
                                  f"{', '.join(failed)}")
        return None
