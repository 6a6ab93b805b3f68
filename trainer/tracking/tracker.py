"""Experiment tracking: rank 0 logs, every other rank stays quiet.

One `Tracker` per process; only the main rank's does anything. Other ranks never import wandb, never
open a file, never print: N ranks writing the same files or N W&B runs is noise at best, corruption at
worst.

Two sinks, in order of trust:
- `run_dir/metrics.jsonl` is the record of truth, written whatever the W&B mode: one JSON object per
  `log()` call, `{"step": step, **record}`, appended (a resumed run continues the file) and flushed per
  line so a killed job keeps everything it logged. JSON has no NaN or Infinity, so non-finite floats are
  written as the strings "nan", "inf" and "-inf" (at any depth, lists included); `float(v)` reads them
  back. Strings rather than null because a diverged loss (nan) and a missing value must stay apart.
  A resumed run re-logs the steps between its checkpoint and the kill: a reader should keep the last line
  per (split, step).
- W&B (`mode` "offline" or "online") is a convenience on top. Compute nodes have no internet, so the
  usual mode is "offline" with a later `wandb sync run_dir/wandb/offline-run-*`. The run id is kept in
  `run_dir/wandb_id.txt` so a requeued job continues the same W&B run (`resume="allow"`). Scalars are
  logged as `<split>/<key>` against a custom x-axis `global_step`, not W&B's own `step=`: that one
  drops any step below the highest seen, with only a warning, and a resumed run re-logs exactly such
  steps (measured, wandb 0.31). Lists stay in metrics.jsonl; `per_class` sends one of them (a recall
  per class) as `<key>/<class>` scalars, or as one table above `class_scalars` classes.
- Who the run is (project, entity, group, name, job type, tags) is decided by `identity.py` and the
  tools; an evaluation passes a run id derived from its settings and `keep_id=False`, so it neither
  reads nor writes the folder's `wandb_id.txt` (which may be a training run's).

W&B must never stop or hang training: `init` is bounded by `init_timeout_s`, `finish` by
`finish_timeout_s`, and any exception from wandb is logged once as a warning, after which W&B is off for
the rest of the run and metrics.jsonl carries on.

Privacy: W&B by default records the command line, every `SLURM_*` variable, git state, a pip freeze and
console output (measured with wandb 0.31: argv and SLURM values land in the run's `.wandb` file, the
config in `wandb/debug.log`). Any of these can hold secrets (an override like `logger.api_key=...`, a
`git+https://token@...` requirement), so they are all switched off (`_PRIVATE`), and the config, the
run's project, entity, group, name and tags, and an artifact's metadata are redacted (by key name and
by value, `provenance.redact_mapping`/`redact_text`) before W&B sees them; `provenance.write()` records
what is needed, redacted. Should a future wandb reject one of these settings, init fails and W&B is off:
privacy fails closed.
"""
from __future__ import annotations

import json
import logging
import math
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

from trainer.runtime.files import atomic_write
from trainer.runtime.progress import Progress
from trainer.tracking.provenance import redact_mapping

log = logging.getLogger(__name__)

Mode = Literal["offline", "online", "disabled"]
MODES = ("offline", "online", "disabled")
METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_id.txt"
SUMMARY_FILE = "summary.json"
STEP_KEY = "global_step"
PROGRESS_LOG_EVERY_S = 30.0  # plain progress lines in a SLURM log: often enough to see life, not a flood
_ID_CHARS = string.ascii_lowercase + string.digits
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
# What wandb would otherwise collect on its own: argv/host/executable/SLURM_* ("meta"), git state (also
# slow: wandb reads it before init's timeout applies), code, pip freeze, and a copy of stdout/stderr.
# SLURM already keeps the console; provenance keeps the rest, redacted. `quiet` drops the "logged in as"
# message, whose identity query runs outside init_timeout (measured: init_timeout=5 took 16 s against a
# refused connection, 6 s with quiet).
_PRIVATE: dict[str, Any] = {
    "x_disable_meta": True,
    "disable_git": True,
    "disable_code": True,
    "save_code": False,
    "x_save_requirements": False,
    "console": "off",
    "quiet": True,
}


def new_run_id() -> str:
    """An 8-character base-36 id like wandb's own (wandb 0.31 no longer exports `wandb.util.generate_id`)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(8))


def _nonfinite(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def jsonable(value: object) -> object:
    """A strict-JSON copy: non-finite floats -> "nan"/"inf"/"-inf"; numpy/torch values -> Python."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _nonfinite(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return jsonable(value.tolist())
    raise TypeError(f"cannot log a value of type {type(value).__name__}: {value!r}")


def wandb_payload(record: Mapping[str, object], step: int) -> dict[str, object]:
    """Scalars of `record` keyed `<split>/<key>`, plus the x-axis. Strings and lists are left out."""
    split = record.get("split")
    prefix = f"{split}/" if isinstance(split, str) and split else ""
    payload: dict[str, object] = {STEP_KEY: step}
    for key, value in record.items():
        if key == "split":
            continue
        if hasattr(value, "ndim") and value.ndim == 0:  # 0-d tensor or numpy scalar
            value = value.item()
        if isinstance(value, bool | int | float):
            payload[f"{prefix}{key}"] = value
    return payload


def metric_key(name: str) -> str:
    """A class name as part of a W&B key: `/` would open a panel section and `.` a nested summary key,
    so anything outside [A-Za-z0-9_-] becomes `_`."""
    return _UNSAFE_KEY.sub("_", name) or "_"


def per_class_payload(key: str, classes: Sequence[str], values: Sequence[float]) -> dict[str, object]:
    """`{<key>/<class>: value}`; two names that clean to the same key keep apart by their class index."""
    payload: dict[str, object] = {}
    for index, (name, value) in enumerate(zip(classes, values)):
        full = f"{key}/{metric_key(name)}"
        payload[full if full not in payload else f"{full}-{index}"] = float(value)
    return payload


def _open_append(path: Path) -> TextIO:
    """Open for appending, line-buffered. A job killed mid-write can leave a last line without its
    newline; appending right after it would fuse two records into one unparseable line."""
    torn = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8", buffering=1)  # closed in Tracker.finish
    if torn:
        f.write("\n")
    return f


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


class Tracker:
    """metrics.jsonl + optional W&B for the main rank; a no-op everywhere else.

    Use as a context manager, or call `finish(exit_code)` on every exit path (it is idempotent).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        is_main: bool,
        mode: Mode,
        project: str,
        name: str | None,
        config: dict,
        run_id: str | None = None,
        init_timeout_s: float = 60.0,
        finish_timeout_s: float = 120.0,
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: Sequence[str] = (),
        keep_id: bool = True,
        class_scalars: int = 100,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.run_id = run_id
        self.class_scalars = class_scalars
        self._run: Any = None
        self._file: TextIO | None = None
        self._progress: Progress | None = None  # made at the first progress() call
        self._finished = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = _open_append(self.run_dir / METRICS_FILE)
        if mode != "disabled":
            if keep_id:
                self.run_id = run_id or _read_text(self.run_dir / RUN_ID_FILE) or new_run_id()
                # Written before init: a job killed inside wandb.init must still resume the same run.
                atomic_write(self.run_dir / RUN_ID_FILE, self.run_id + "\n")
            else:
                self.run_id = run_id or new_run_id()
            who = {"project": project, "entity": entity, "group": group, "name": name, "job_type": job_type,
                   "tags": list(tags) or None}
            self._run = self._start_wandb(mode, who, config, init_timeout_s, finish_timeout_s)

    def _start_wandb(self, mode: Mode, who: dict[str, Any], config: dict, init_s: float, finish_s: float
                     ) -> Any:
        try:
            import wandb

            settings = wandb.Settings(
                init_timeout=init_s, x_service_wait=init_s, finish_timeout=finish_s, **_PRIVATE
            )
            # names too: a URL with a password or a key in logger.name lands in the run's files
            run = wandb.init(
                mode=mode, dir=str(self.run_dir), id=self.run_id, resume="allow",
                config=redact_mapping(config), settings=settings, **redact_mapping(who),
                # Independent of any other run in the process: we only ever call methods on `run`.
                reinit="create_new",
            )
            run.define_metric(STEP_KEY)
            run.define_metric("*", step_metric=STEP_KEY)
            return run
        except Exception as exc:  # any W&B failure must leave training running
            self._wandb_failed("init", exc)
            return None

    def _wandb_failed(self, what: str, exc: BaseException) -> None:
        # The broken run is dropped, not finished: finishing a broken run can block, and wandb's own
        # atexit hook closes it when the process ends.
        self._run = None
        log.warning(
            "W&B %s failed (%s: %s); W&B is off for the rest of this run, %s keeps every record",
            what, type(exc).__name__, exc, self.run_dir / METRICS_FILE,
        )

    def log(self, record: Mapping[str, object], step: int) -> None:
        """Append `{"step": step, **record}` to metrics.jsonl and send the scalars to W&B."""
        if self._file is None:
            return
        if "step" in record:
            raise ValueError("record must not contain 'step': pass it as the step argument")
        line = json.dumps({"step": step, **jsonable(record)}, allow_nan=False)  # type: ignore[dict-item]
        self._file.write(line + "\n")
        self._file.flush()
        if self._run is not None:
            try:
                self._run.log(wandb_payload(record, step))
            except Exception as exc:
                self._wandb_failed("log", exc)

    def summary(self, values: Mapping[str, object]) -> None:
        """Final numbers: merged into `run_dir/summary.json` and the W&B run summary."""
        if self._file is None:
            return
        path = self.run_dir / SUMMARY_FILE
        try:
            merged = json.loads(_read_text(path) or "{}")
        except json.JSONDecodeError:
            merged = {}
        merged.update(jsonable(values))  # type: ignore[arg-type]
        atomic_write(path, json.dumps(merged, indent=2, allow_nan=False) + "\n")
        if self._run is not None:
            try:
                self._run.summary.update(dict(values))
            except Exception as exc:
                self._wandb_failed("summary", exc)

    def per_class(self, key: str, classes: Sequence[str], values: Sequence[float], step: int) -> None:
        """`values[i]` of `classes[i]` to W&B: scalars `<key>/<class>` up to `class_scalars` classes (a
        chart per class across steps, comparable between the runs of a group), else one table per call.
        The caller has already put the list into metrics.jsonl with `log`."""
        if self._run is None:
            return
        if len(classes) <= self.class_scalars:
            self.log_wandb(lambda wandb: per_class_payload(key, classes, values), step)
            return
        # None, not NaN, for a class without samples: a table column holds one type
        rows = [[c, None if math.isnan(v) else float(v)] for c, v in zip(classes, values)]
        self.log_wandb(lambda wandb: {key: wandb.Table(columns=["class", "value"], data=rows)}, step)

    def log_wandb(self, build: Callable[[Any], Mapping[str, object]], step: int) -> None:
        """W&B-only objects (images from arrays, tables, custom charts): `build(wandb)` returns them,
        logged at `step` on the `global_step` axis. Not called at all without a W&B run, so building is
        free when logger.mode=disabled; any exception turns W&B off like every other W&B failure."""
        if self._run is None:
            return
        try:
            import wandb

            self._run.log({STEP_KEY: step, **build(wandb)})
        except Exception as exc:
            self._wandb_failed("log", exc)

    def log_artifact(self, name: str, kind: str, files: Sequence[Path], metadata: Mapping[str, object],
                     aliases: Sequence[str] = ()) -> None:
        """`files` as one W&B artifact. wandb copies them into its staging folder (WANDB_DATA_DIR) at
        once, so an offline run can be synced later even if the files have changed since."""
        if self._run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(name, type=kind, metadata=redact_mapping(dict(metadata)))
            for path in files:
                artifact.add_file(str(path))
            self._run.log_artifact(artifact, aliases=list(aliases) or None)
        except Exception as exc:
            self._wandb_failed("artifact", exc)

    def media(self, images: Mapping[str, Path], tables: Mapping[str, tuple[list[str], list[list]]],
              step: int) -> None:
        """Figures (PNG files already on disk) and tables to W&B; nothing to do without a W&B run."""
        if self._run is None:
            return
        try:
            import wandb

            payload: dict[str, object] = {STEP_KEY: step}
            payload.update({name: wandb.Image(str(path)) for name, path in images.items()})
            payload.update({name: wandb.Table(columns=columns, data=rows)
                            for name, (columns, rows) in tables.items()})
            self._run.log(payload)
        except Exception as exc:
            self._wandb_failed("media", exc)

    def progress(self, step: int, total: int, text: str = "", every_s: float = PROGRESS_LOG_EVERY_S) -> None:
        """A tqdm bar on a terminal, else an INFO line (time, rate, ETA) at most every `every_s` seconds
        and at the last step (`trainer.runtime.progress`). The rate counts from the first call."""
        if not self.is_main or self._finished:
            return
        if self._progress is None:
            self._progress = Progress("step", total, every_s=every_s, unit="step", start=None, logger=log)
        self._progress.update(step, text, total=total)

    def finish(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and the W&B run (with `exit_code`). Idempotent, never raises for W&B."""
        if self._finished:
            return
        self._finished = True
        if self._progress is not None:
            self._progress.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        run, self._run = self._run, None
        if run is None:
            return
        try:
            offline = run.settings.mode == "offline"
            run.finish(exit_code=exit_code)
        except Exception as exc:
            self._wandb_failed("finish", exc)
            return
        if offline:  # every start of this run, in one command; wandb syncs them in start order
            log.info("W&B run saved offline; upload it with: wandb sync %s/wandb/offline-run-*-%s*",
                     self.run_dir, self.run_id)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finish(0 if exc_type is None else 1)
