"""Atomic, verifiable checkpoints with last-k retention, a best copy, and resume from the newest good one.

Layout of `directory` (one writer per directory: the main rank of one job):
    step-000001000.pt    torch.save of the whole training state
    step-000001000.done  its marker, JSON {step, bytes, sha256, time}: what the .pt holds when whole
    best.pt / best.done  the state that scored the best metric: a hard link to that step's .pt (a copy
                         where the filesystem has no hard links); its marker adds {metric, higher_is_better}
    best.json            {step, metric, higher_is_better, bytes, sha256}: a readable copy of best.done's
                         record, and a second witness when the marker is lost

Every file is written through `trainer.runtime.files.atomic_write` (temporary name, fsync, rename,
directory fsync), so each name always holds a whole old or a whole new file. A file loads only if its
bytes match (size and sha256) an entry of its marker. A new .pt is written before its marker, so a
process killed at any moment leaves either a complete pair or a .pt without a valid marker, which is
never loaded. Replacing a .pt that already has a valid marker (best.pt at each improvement, a re-saved
step) goes: marker := {new, "previous": old}; .pt := new; best.json; marker := {new}. The marker vouches
for both contents while the .pt is swapped, so there is no moment (kill, ENOSPC) at which neither the
old nor the new best loads. A Checkpointer on the main rank settles a two-entry or lost best marker when
it can prove which whole file best.pt is (its sha256 matches the marker, best.json or a step marker) and
rewrites marker and best.json; `load` accepts the same proof read-only.

best.pt is a second name for the step checkpoint's file (`os.link` to a temporary, then the same rename
as any write), not a second copy: while the step file is kept it costs no space, and after pruning its
bytes live on under best.pt alone. Every step file is written to a new inode and never modified in place,
so the two names cannot diverge through taxotrain; byte for byte best.pt is what a copy would be, and all
the marker logic above holds unchanged. Whoever edits one name in place (`cp x best.pt` truncates and
rewrites the shared file) changes both: the sha256 check then refuses both, and resume walks back. A
filesystem that refuses the link (EPERM, EMLINK, ENOTSUP, ...) gets a byte copy, as before.

`latest()` only checks that the marker exists and the size agrees (cheap: no read of the data);
`load()` checks the sha256 as well, and `load_latest()` walks back past corrupt checkpoints with a warning.
Only regular files are read: a FIFO or device named like a checkpoint, marker or best.json is refused
(CheckpointError naming it) without being opened for a blocking read, so it cannot hang a resume.
Everything loads with `torch.load(weights_only=True)`, so the state must consist of tensors and plain
Python containers/scalars (see trainer/rng.py and the LambdaLR note in trainer/schedule.py); the first
`save()` of each Checkpointer proves this by loading the bytes back, so a bad state fails at the first
save rather than at resume time.

`save()` does no collectives: the caller puts a barrier after it before any rank reads the directory.
`save(background=True)` copies the state's tensors to CPU memory and leaves the rest (serialising,
hashing, the writes and their fsyncs, the best link, pruning) to one thread, so a run trains on while
its checkpoint goes to disk; one save at a time, in order: the next `save()` and `wait()` first wait
for it and raise its error (a WriteError names the path). The files and their order are those of a
synchronous save, so everything above holds whenever the process is killed.
What a training state holds, and its format version, is `trainer/state.py`'s business: this module
stores and verifies any such dict.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import operator
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import torch

from trainer.runtime.exits import UsageError
from trainer.runtime.files import SpecialFile, atomic_path, atomic_write, open_regular, write_error

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"step-(\d+)\.(pt|done)")
# Only our own temporaries (`.{final name}.tmp-{pid}-{random}`), never other files a user keeps here.
_TEMP_FILE = re.compile(r"\.(?:step-\d+|best)\.(?:pt|done|json)\.tmp-")
_BEST = "best"


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not load with weights_only=True."""


def _marker_path(pt: Path) -> Path:
    return pt.with_suffix(".done")


@contextmanager
def _open_regular(path: Path) -> Iterator[BinaryIO]:
    """`path` opened for reading if it is a regular file (`files.open_regular`: a FIFO would block the
    open forever); CheckpointError naming it otherwise. FileNotFoundError passes through."""
    try:
        with open_regular(path) as fh:
            yield fh
    except FileNotFoundError:
        raise
    except SpecialFile as e:
        raise CheckpointError(f"{e}: refusing to read it (remove it)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e


def _read_regular(path: Path) -> bytes:
    with _open_regular(path) as fh:
        return fh.read()


def _size_and_sha256(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with _open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _is_entry(raw: Any) -> bool:
    """A marker entry names the bytes it vouches for: {step, bytes, sha256, ...}."""
    return (isinstance(raw, dict) and isinstance(raw.get("step"), int) and isinstance(raw.get("bytes"), int)
            and isinstance(raw.get("sha256"), str))


def _read_marker(pt: Path) -> dict[str, Any]:
    """The parsed, type-checked marker of `pt`; CheckpointError if it is missing or malformed."""
    marker = _marker_path(pt)
    try:
        m = json.loads(_read_regular(marker))
    except FileNotFoundError:
        raise CheckpointError(f"{pt}: no completeness marker {marker.name} (interrupted save?)") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise CheckpointError(f"{pt}: unreadable marker {marker.name}: {e}") from e
    if not _is_entry(m):
        raise CheckpointError(f"{pt}: malformed marker {marker.name}: {m!r}")
    return m


def _entries(marker: dict[str, Any]) -> list[dict[str, Any]]:
    """What a marker vouches for: its own entry, then the one it replaces while a .pt is being swapped."""
    def bare(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if k != "previous"}

    previous = marker.get("previous")
    return [bare(marker), bare(previous)] if _is_entry(previous) else [bare(marker)]


def _matching(entries: list[dict[str, Any]], size: int, sha256: str | None = None) -> list[dict[str, Any]]:
    return [e for e in entries if e["bytes"] == size and sha256 in (None, e["sha256"])]


def _best_json(directory: Path, quiet: bool = False) -> dict[str, Any] | None:
    """best.json if it is a well-formed record {step, metric, higher_is_better, ...}, else None (warned)."""
    path = directory / f"{_BEST}.json"
    try:
        best = json.loads(_read_regular(path))
    except FileNotFoundError:
        return None
    except (CheckpointError, ValueError) as e:
        if not quiet:
            log.warning("ignoring unreadable %s (%s)", path, e)
        return None
    if _best_of(best) is None:
        if not quiet:
            log.warning("ignoring malformed %s (%r)", path, best)
        return None
    return best


def _best_of(record: Any) -> dict[str, Any] | None:
    """{step, metric, higher_is_better} from a best.json or best marker entry, None if it lacks them."""
    ok = (isinstance(record, dict) and isinstance(record.get("step"), int)
          and isinstance(record.get("metric"), (int, float))
          and isinstance(record.get("higher_is_better"), bool))
    return {k: record[k] for k in ("step", "metric", "higher_is_better")} if ok else None


def _witnesses(pt: Path) -> Iterator[dict[str, Any]]:
    """Entries that may vouch for the bytes of `pt`: its marker's, and for best.pt also best.json's and
    those of every step marker (best.pt holds the bytes of the step checkpoint it was saved with)."""
    try:
        yield from _entries(_read_marker(pt))
    except CheckpointError:
        pass
    if pt.name != f"{_BEST}.pt":
        return
    recorded = _best_json(pt.parent, quiet=True)
    if _is_entry(recorded):
        yield recorded
    for name in sorted(os.listdir(pt.parent), reverse=True):
        if (m := _STEP_FILE.fullmatch(name)) and m[2] == "done":
            try:
                yield from _entries(_read_marker(pt.parent / f"step-{m[1]}.pt"))
            except CheckpointError:
                continue


def _vouched(pt: Path, size: int, sha256: str) -> dict[str, Any] | None:
    """The first witness of `pt` whose size and sha256 are those of its bytes: proof that they are whole."""
    return next((e for e in _witnesses(pt) if e["bytes"] == size and e["sha256"] == sha256), None)


def _current_entry(pt: Path) -> dict[str, Any] | None:
    """The marker entry describing the bytes now at `pt` (by size; by sha256 if sizes tie), else None."""
    try:
        entries = _entries(_read_marker(pt))
        st = os.stat(pt)
    except (CheckpointError, OSError):
        return None
    found = _matching(entries, st.st_size) if stat.S_ISREG(st.st_mode) else []
    if len(found) > 1:
        try:
            found = _matching(found, *_size_and_sha256(pt))
        except (CheckpointError, OSError):
            return None
    return found[0] if found else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _link(source: Path, tmp: Path, size: int) -> bool:
    """Whether `tmp` is now a hard link to `source`, a regular file of `size` bytes; False leaves no `tmp`."""
    try:
        os.link(source, tmp)
    except OSError as e:  # EXDEV, EPERM (FAT, some FUSE and network mounts), EMLINK, ENOTSUP, ENOSPC, ...
        log.info("cannot hard-link %s (%s): writing a copy", source, e)
        return False
    st = os.lstat(tmp)
    if stat.S_ISREG(st.st_mode) and st.st_size == size:
        return True
    tmp.unlink()  # `source` changed under us: the caller's bytes are the truth
    return False


def _write_marked(pt: Path, data: memoryview, sha256: str, record: dict[str, Any],
                  between: dict[Path, bytes] | None = None, same_as: Path | None = None) -> None:
    """Write `pt`, then `between`, then its marker {**record, bytes, sha256, time} (module docstring).

    If the marker already vouches for the bytes at `pt`, it first vouches for the old and the new bytes,
    so that `pt` stays loadable while it is swapped and after a failed or killed write. `same_as`, a file
    that holds exactly `data`, is hard-linked instead of writing the bytes again where the filesystem
    allows."""
    marker = _marker_path(pt)
    new = {**record, "bytes": len(data), "sha256": sha256, "time": _now()}
    old = _current_entry(pt)
    if old is None:
        # A marker describing other bytes (a stale or foreign one) must not outlive their replacement.
        try:
            if os.path.lexists(marker):  # (unlinking a missing file is EROFS on a read-only filesystem)
                marker.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise write_error(marker, e) from e
    elif old["sha256"] != sha256:
        atomic_write(marker, json.dumps({**new, "previous": old}))
    with atomic_path(pt) as tmp:
        if same_as is None or not _link(same_as, tmp, len(data)):
            with open(tmp, "xb") as fh:
                fh.write(data)  # not atomic_write: the caller hashed these bytes once for all their copies
    for path, content in (between or {}).items():
        atomic_write(path, content)
    atomic_write(marker, json.dumps(new))


def _cpu_copy(value: Any, spare: Any = None) -> Any:
    """`value` with every tensor copied to CPU memory and every container rebuilt (a state_dict keeps its
    class and `_metadata`): what a background save writes while the caller changes the originals in
    place (the next optimizer step). Tensors that shared storage are copied apart: the same values.

    `spare`, the last save's copy (written already), lends its tensors where shape, dtype and strides
    agree: copying into memory in use takes half the time of fresh memory (its page faults), on the
    critical path of every epoch."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if (isinstance(spare, torch.Tensor) and spare.shape == value.shape and spare.dtype == value.dtype
                and spare.stride() == value.stride() and spare.device.type == "cpu"):
            return spare.copy_(value)
        return value.to("cpu", copy=True)
    if isinstance(value, dict):
        out = copy.copy(value)
        for key, item in value.items():
            out[key] = _cpu_copy(item, spare.get(key) if isinstance(spare, dict) else None)
        return out
    if type(value) in (list, tuple):
        spares = spare if type(spare) is type(value) and len(spare) == len(value) else [None] * len(value)
        return type(value)(_cpu_copy(item, other) for item, other in zip(value, spares))
    return value  # numbers, strings, None: immutable


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
        self._writing: threading.Thread | None = None  # the background save in progress
        self._failure: BaseException | None = None     # its error, raised by the next wait()
        self._spare: dict[str, Any] | None = None         # its state copy, memory for the next one
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
        """Cheap validity: the marker parses and names this step; the .pt is a regular file of its size."""
        pt = self._step_path(step)
        try:
            entries = _entries(_read_marker(pt))
            st = os.stat(pt)
        except (CheckpointError, OSError):
            return False
        return stat.S_ISREG(st.st_mode) and any(e["step"] == step for e in _matching(entries, st.st_size))

    def _complete_steps(self) -> list[int]:
        """Cheaply valid steps, newest first."""
        return sorted((s for s in self._scan() if self._complete(s)), reverse=True)

    # ------------------------------------------------------------------ best

    @property
    def best(self) -> dict[str, Any] | None:
        """{step, metric, higher_is_better} of best.pt, or None if there is no (consistent) best yet."""
        return dict(self._best) if self._best is not None else None

    def _read_best(self) -> dict[str, Any] | None:
        """best.json's record if marker, best.json and the size of best.pt agree; else `_settle_best`."""
        pt = self.directory / f"{_BEST}.pt"
        if not os.path.lexists(pt):
            if os.path.lexists(self.directory / f"{_BEST}.json"):
                log.warning("%s exists but %s does not: the next metric becomes the best",
                            self.directory / f"{_BEST}.json", pt.name)
            return None
        recorded = _best_json(self.directory)
        try:
            marker = _read_marker(pt)
            size = os.stat(pt).st_size
        except (CheckpointError, OSError) as e:
            log.warning("%s: checking %s by its sha256", e, pt.name)
            return self._settle_best(pt, recorded)
        # best.json written before it recorded bytes and sha256 (older taxotrain) agrees by step.
        agrees = (recorded is not None and "previous" not in marker and marker["bytes"] == size
                  and recorded["step"] == marker["step"]
                  and recorded.get("sha256", marker["sha256"]) == marker["sha256"])
        return _best_of(recorded) if agrees else self._settle_best(pt, recorded)

    def _settle_best(self, pt: Path, recorded: dict[str, Any] | None) -> dict[str, Any] | None:
        """After an interrupted or failed best update: prove by sha256 which whole file best.pt is, and on
        the main rank rewrite best.done and best.json to say so; the best record, or None if unknown."""
        try:
            size, digest = _size_and_sha256(pt)
            entry = _vouched(pt, size, digest)
        except (CheckpointError, OSError) as e:
            entry, why = None, str(e)
        else:
            why = f"{pt}: neither {_marker_path(pt).name}, {_BEST}.json nor a step marker records its sha256"
        if entry is None:
            log.warning("best checkpoint is incomplete (%s): the next metric becomes the best", why)
            return None
        best = _best_of(entry)
        if best is None and recorded is not None and recorded["step"] == entry["step"]:
            best = _best_of(recorded)  # best.done of an older taxotrain lost; its best.json names the step
        if self.is_main:
            self._rewrite_best(pt, entry, best)
        return best

    def _rewrite_best(self, pt: Path, entry: dict[str, Any], best: dict[str, Any] | None) -> None:
        whole = {"step": entry["step"], "bytes": entry["bytes"], "sha256": entry["sha256"]}
        try:
            if best is None:
                # best.json describes other bytes: forgotten, so the next metric becomes the best.
                self._unlink(self.directory / f"{_BEST}.json")
            else:
                atomic_write(self.directory / f"{_BEST}.json", json.dumps({**best, **whole}))
            atomic_write(_marker_path(pt), json.dumps({**whole, **(best or {}), "time": _now()}))
        except OSError as e:
            # Not fatal: load() accepts the same proof read-only, so best.pt still loads.
            log.warning("could not rewrite the marker of %s: %s", pt, e)
            return
        done = f" and {_BEST}.json" if best else f"; its metric is unknown, so {_BEST}.json was removed"
        log.warning("%s holds step %d (proven by sha256): rewrote %s%s", pt, entry["step"],
                    _marker_path(pt).name, done)

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

    def _save_best(
        self, data: memoryview, sha256: str, step: int, metric: float, higher_is_better: bool
    ) -> None:
        """best.pt := the step checkpoint just written (a hard link to it), with best.json and marker."""
        best = {"step": step, "metric": metric, "higher_is_better": higher_is_better}
        described = {**best, "bytes": len(data), "sha256": sha256}
        # best.json goes between data and marker; the marker entries carry the metric too, so whichever
        # of the old and new best.pt a kill or a full disk leaves, its record can be restored.
        _write_marked(self.directory / f"{_BEST}.pt", data, sha256, best,
                      between={self.directory / f"{_BEST}.json": json.dumps(described).encode()},
                      same_as=self._step_path(step))
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
        self, state: dict[str, Any], step: int, metric: float | None = None, higher_is_better: bool = True,
        background: bool = False,
    ) -> Path | None:
        """Write `state` as checkpoint `step`, and as best.pt if `metric` improves; None off the main rank.

        `background`: returns once the tensors are copied; the file is on disk after `wait()`."""
        if not self.is_main:
            return None
        step = _check_step(step)
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        metric = None if metric is None else float(metric)
        self.wait()  # the previous save first: the steps reach the disk in order, and its error surfaces
        if not background:
            return self._write(state, step, metric, higher_is_better)
        # the last copy is free now (written): the next save would wait for this one before reusing it
        self._spare = _cpu_copy(state, self._spare)
        args = (self._spare, step, metric, higher_is_better)
        # not a daemon: an interpreter that exits (or fails) with a save under way finishes it first
        self._writing = threading.Thread(target=self._write_or_keep_failure, args=args,
                                         name=f"checkpoint-{step}")
        self._writing.start()
        return self._step_path(step)

    def wait(self) -> None:
        """Returns when the background save, if any, is on disk; raises its error (once)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.join()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def improves(self, metric: float, higher_is_better: bool = True) -> bool:
        """Whether `metric` would become the best (compared with the best written so far)."""
        return self._improves(float(metric), higher_is_better)

    def _write_or_keep_failure(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # the thread's end: wait() raises it in the caller's thread
            self._failure = e

    def _write(self, state: dict[str, Any], step: int, metric: float | None, higher_is_better: bool) -> Path:
        data = self._serialize(state)
        sha256 = hashlib.sha256(data).hexdigest()
        newer = [s for s in self._complete_steps() if s > step]
        if newer:
            log.warning("saving step %d while newer checkpoints exist (steps %s): auto-resume prefers those; "
                        "remove them if this run rolled back on purpose", step, newer)
        path = self._step_path(step)
        _write_marked(path, data, sha256, {"step": step})
        self._prune(step)
        # Last, so that a ValueError from a changed higher_is_better cannot cost the step checkpoint.
        if metric is not None and self._improves(metric, higher_is_better):
            self._save_best(data, sha256, step, metric, higher_is_better)
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

    def disk_usage(self) -> tuple[int, int]:
        """(bytes, files) of the directory's regular files, each file's bytes counted once however many
        names it has (best.pt and its step checkpoint), as `du -sb` counts them."""
        seen: dict[tuple[int, int], int] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0, 0
        for name in names:
            try:
                st = os.lstat(self.directory / name)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                seen[(st.st_dev, st.st_ino)] = st.st_size
        return sum(seen.values()), len(seen)

    # ------------------------------------------------------------------ loading

    def latest(self) -> Path | None:
        """The newest checkpoint whose marker exists and whose size matches (sha256 is checked on load)."""
        complete = self._complete_steps()
        return self._step_path(complete[0]) if complete else None

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        """Verified load of one checkpoint onto the CPU; CheckpointError naming `path` on any problem.

        The bytes must match an entry of the marker; for best.pt, whose marker an interrupted update of
        an older taxotrain may have lost, best.json or a step marker recording its sha256 also vouches."""
        path = Path(path)
        is_best = path.name == f"{_BEST}.pt"
        try:
            entries, missing = _entries(_read_marker(path)), None
        except CheckpointError as e:
            if not is_best:
                raise
            entries, missing = [], e
        # The whole file is read once for hashing and unpickling: peak memory is file size + tensors.
        try:
            data = _read_regular(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        digest = hashlib.sha256(data).hexdigest()
        if not _matching(entries, len(data), digest) and not (is_best and _vouched(path, len(data), digest)):
            if missing is not None:
                raise missing
            if not _matching(entries, len(data)):
                raise CheckpointError(f"{path}: {len(data)} bytes but the marker records "
                                      f"{entries[0]['bytes']} (truncated or overwritten)")
            raise CheckpointError(f"{path}: sha256 {digest} does not match the marker's "
                                  f"{entries[0]['sha256']} (corrupted)")
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
