"""`launcher=slurm`: submit training to SLURM through Submitit, one srun task per rank.

Preemption and time limits: SLURM sends `launcher.signal` to every task `launcher.signal_lead_s`
before the end; the trainer's handler only sets a flag, all ranks stop at the next step and write a
checkpoint, and the training process returns `EXIT_PREEMPTED`. Rank 0 then requeues the job with
`scontrol requeue` (at most `launcher.max_requeues` times); the requeued job runs the same pickled
task, which resumes from the newest checkpoint in `run_dir`. Submitit's own signal handler, which
would checkpoint from inside the handler, is replaced by the trainer's as soon as training starts.

`-m` sweeps with `launcher=slurm`: every sweep point is collected and `ArrayCallback` submits them
together as one job array when the sweep ends.

`launcher.dry_run=true` goes through the very same Submitit submission, with a stub `sbatch` first on
PATH and a temporary Submitit folder, and prints the script Submitit handed to it (`#SBATCH --array`
included) and what each task would run; nothing reaches SLURM and nothing is left in the log folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import submitit
from hydra.experimental.callback import Callback

from trainer.config import LauncherConfig, TrainConfig
from trainer.runtime import distributed
from trainer.runtime.exits import EXIT_PREEMPTED, ConfigError

log = logging.getLogger(__name__)
_PENDING: list[TrainConfig] = []  # sweep points waiting for ArrayCallback


class TrainTask:
    """What every srun task runs (pickled by Submitit): train, and on a stop, requeue the job."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> int:
        from trainer.jobs.run import run  # the node imports torch, not the login node that pickled us

        # no Hydra here (the config was resolved at submission): log to stdout, which Submitit keeps
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        code = run(self.cfg)
        # the trainer's handlers are gone now and Submitit's are back: one more signal must not requeue
        # the job a second time
        for name in self.cfg.trainer.signals:
            signal.signal(signal.Signals[name], signal.SIG_IGN)
        if code == EXIT_PREEMPTED and requeue(self.cfg.launcher.max_requeues):
            _await_kill()
        if code != 0:
            raise RuntimeError(f"training exited with code {code}; see this task's log")
        return code


    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Submitit calls this on a signal that arrives before training has started (its handler is
        replaced by the trainer's afterwards): there is nothing to save yet, so requeue as is."""
        return submitit.helpers.DelayedSubmission(TrainTask(self.cfg))


def requeue(max_requeues: int) -> bool:
    """Whether this job is being requeued; rank 0 asks SLURM for it (every rank decides alike)."""
    job = distributed.slurm_job()
    if job is None:
        return False
    if job.restarts >= max_requeues:
        log.error("job %s stopped with a checkpoint but was already requeued %d times "
                  "(launcher.max_requeues): not requeued; submit again to continue", job.job_id, job.restarts)
        return False
    if distributed.is_main():
        log.info("requeueing job %s (requeue %d of at most %d)", job.job_id, job.restarts + 1, max_requeues)
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=60)
    return True


def _await_kill(limit_s: float = 300) -> None:
    # Returning would make Submitit write this run's result file, and a waiting `launcher.wait=true`
    # would take the requeued job for finished; SLURM ends this process as part of the requeue.
    time.sleep(limit_s)
    raise RuntimeError(f"job was requeued but this task was not stopped within {limit_s:.0f} s")


# ---------------------------------------------------------------- checks before anything is queued


def preflight(cfg: TrainConfig) -> None:
    """What can be known on the login node fails here, naming the setting, before a job waits in queue
    (the schema has already checked the settings themselves, `data.shards` included).

    A dry run submits nothing, so it also works off the cluster (to read the script first); there the
    partition cannot be checked."""
    on_cluster = shutil.which("sbatch") is not None
    if not on_cluster and not cfg.launcher.dry_run:
        raise ConfigError("launcher=slurm: no sbatch on this machine (run from a SLURM login node)")
    if cfg.launcher.partition and on_cluster:
        known = partitions()
        if known and cfg.launcher.partition not in known:
            raise ConfigError(f"launcher.partition={cfg.launcher.partition!r} does not exist; "
                              f"partitions here: {sorted(known)}")


def partitions() -> set[str]:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    return {line.strip().rstrip("*") for line in out.stdout.splitlines() if line.strip()}


# ---------------------------------------------------------------- the executor


def executor(launcher: LauncherConfig, folder: Path) -> submitit.SlurmExecutor:
    # max_num_timeout=0: Submitit's own requeue is not used; TrainTask requeues after the checkpoint
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    params: dict[str, object] = {
        "job_name": launcher.job_name,
        "nodes": launcher.nodes,
        "ntasks_per_node": launcher.ranks_per_node,
        "cpus_per_task": launcher.cpus_per_task,
        "time": launcher.time_min,
        "signal_delay_s": launcher.signal_lead_s,
        "setup": list(launcher.setup),
        "stderr_to_stdout": True,
        # once a task has ended, the others get 60 s to end too, then are killed: a crashed task ends
        # the job. Not --kill-on-bad-exit: a requeue ends every task, and exit codes stay meaningful.
        "srun_args": ["--wait=60"],
        "additional_parameters": {"requeue": True, "signal": f"{launcher.signal}@{launcher.signal_lead_s}",
                                  **launcher.sbatch_extra},
    }
    optional = {"partition": launcher.partition, "account": launcher.account, "qos": launcher.qos,
                "constraint": launcher.constraint, "exclude": launcher.exclude,
                "gpus_per_node": launcher.gpus_per_node or None,
                "mem": f"{launcher.mem_gb}GB" if launcher.mem_gb else None}
    params.update({k: v for k, v in optional.items() if v is not None})
    ex.update_parameters(**params)
    return ex


def log_folder(cfg: TrainConfig) -> Path:
    """Submitit's folder (sbatch script, logs, results): launcher.log_dir, else run_dir/slurm."""
    return Path(cfg.launcher.log_dir or Path(cfg.run_dir) / "slurm").expanduser().resolve()


def for_the_job(cfg: TrainConfig) -> TrainConfig:
    # relative paths are relative to the submitting directory, not to wherever the job lands
    data = replace(cfg.data, shards=str(Path(cfg.data.shards).expanduser().resolve())
                   if cfg.loader.backend != "synthetic" else cfg.data.shards)
    return replace(cfg, data=data, run_dir=str(Path(cfg.run_dir).expanduser().resolve()))


def submit(cfg: TrainConfig) -> int:
    """Submit one training job; print its id and log path; with launcher.wait, its final state."""
    preflight(cfg)
    cfg = for_the_job(cfg)
    if cfg.launcher.dry_run:
        print(dry_run([cfg], log_folder(cfg)))
        return 0
    (job,) = queue(executor(cfg.launcher, log_folder(cfg)), [cfg])
    print(f"submitted SLURM job {job.job_id}\n  run_dir: {cfg.run_dir}\n  logs:    {job.paths.stdout}")
    return _wait(job) if cfg.launcher.wait else 0


def queue(ex: submitit.SlurmExecutor, cfgs: list[TrainConfig]) -> list[submitit.Job]:
    """One job, or one job array (task i runs cfgs[i]) for several: the only submission, dry runs too."""
    with ex.batch():
        jobs = [ex.submit(TrainTask(c)) for c in cfgs]
    return jobs


# Stand-ins for a dry run: sbatch answers what Submitit parses from its output (`job (\d+)`) and submits
# nothing; srun only has to exist (SlurmExecutor looks for it), it runs inside the job, which never starts.
_STUBS = {"sbatch": '#!/bin/sh\n# taxotrain dry run: no job is submitted\necho "Submitted batch job 1"\n',
          "srun": '#!/bin/sh\necho "taxotrain dry run: not a SLURM srun" >&2\nexit 1\n'}


def dry_run(cfgs: list[TrainConfig], folder: Path) -> str:
    """The script sbatch would get for `cfgs` in Submitit folder `folder`, and what each task runs.

    Submitit's ordinary submission (`queue`) runs against stub sbatch/srun in a temporary folder; the
    script is read back from the job's `paths.submission_file`, each task's run from the pickle that
    Submitit wrote for it. The temporary folder's path is then replaced by `folder` in the script.
    """
    # the folder appears shell-quoted in the script: a stand-in that quotes alike is replaced exactly
    plain = shlex.quote(str(folder)) == str(folder)
    with tempfile.TemporaryDirectory(prefix="taxotrain-dry-run-" if plain else "taxotrain dry run ") as tmp:
        stubs, staging = Path(tmp) / "bin", Path(tmp) / "slurm"
        stubs.mkdir()
        for name, text in _STUBS.items():
            (stubs / name).write_text(text)
            (stubs / name).chmod(0o755)
        with _first_on_path(stubs):
            if shutil.which("sbatch") != str(stubs / "sbatch"):
                raise RuntimeError(f"dry run: {stubs}/sbatch is not the one on PATH; nothing submitted")
            jobs = queue(executor(cfgs[0].launcher, staging), cfgs)
        script = jobs[0].paths.submission_file.read_text()
        # what each task runs, as Submitit pickled it; an array task's job id is <array id>_<task id>
        tasks = {j.job_id.partition("_")[2]: submitit.helpers.DelayedSubmission.load(j.paths.submitted_pickle)
                 .function.cfg for j in jobs}
    lines = [script.replace(str(staging), str(folder)).rstrip("\n"), "",
             f"dry run: nothing submitted. sbatch would get the script above (Submitit folder: {folder}).",
             *describe_tasks(tasks)]
    return "\n".join(lines)


def describe_tasks(tasks: dict[str, TrainConfig]) -> list[str]:
    """Per array task (by SLURM_ARRAY_TASK_ID): its run_dir and the settings in which the tasks differ."""
    if len(tasks) == 1:
        return [f"one job: run_dir={cfg.run_dir}" for cfg in tasks.values()]
    flat = {task: _flatten(dataclasses.asdict(cfg)) for task, cfg in tasks.items()}
    keys = sorted({k for f in flat.values() for k in f} - {"run_dir"})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat.values()}) > 1]
    lines = [f"job array of {len(tasks)} tasks (SLURM_ARRAY_TASK_ID: run_dir and the settings that differ):"]
    for task, f in flat.items():
        settings = (f"{k}={_show(f.get(k))}" for k in differ)
        lines.append(" ".join([f"  task {task}: run_dir={f['run_dir']}", *settings]))
    return lines


def _flatten(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: object) -> str:
    """A value as it would be written on the command line."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


@contextlib.contextmanager
def _first_on_path(directory: Path) -> Iterator[None]:
    """`directory` first on PATH for the subprocesses started meanwhile (Submitit runs `sbatch` so)."""
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(directory), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def _wait(job: submitit.Job) -> int:
    """Block until every task has finished; 0 when all returned normally."""
    # without SLURM accounting (sacct), Submitit warns on every poll; the result files decide anyway
    quiet = logging.getLogger("submitit")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        job.wait()
        job.results()  # one result per task; re-raises a task's failure with its traceback
    except Exception as err:
        print(f"job {job.job_id} failed: {err}")
        return 1
    finally:
        quiet.setLevel(level)
    print(f"job {job.job_id} finished: every task returned normally")
    return 0


# ---------------------------------------------------------------- sweeps -> job arrays


def defer(cfg: TrainConfig) -> None:
    """A sweep point of `-m launcher=slurm`: checked now, submitted with the others by ArrayCallback."""
    preflight(cfg)
    _PENDING.append(for_the_job(cfg))


def submit_array(cfgs: list[TrainConfig], folder: Path) -> int:
    """All runs as one SLURM job array (same launcher settings); with launcher.wait, wait for all."""
    first = cfgs[0]
    if len({repr(c.launcher) for c in cfgs}) > 1:
        raise ConfigError("launcher.*: a job array needs the same launcher settings for every run")
    if first.launcher.dry_run:
        print(dry_run(cfgs, folder))
        return 0
    jobs = queue(executor(first.launcher, folder), cfgs)
    print(f"submitted SLURM job array of {len(jobs)}: {[j.job_id for j in jobs]}\n  logs: {folder}")
    return max(_wait(j) for j in jobs) if first.launcher.wait else 0


class ArrayCallback(Callback):
    """Hydra callback: at the end of a sweep, submit the collected points as one SLURM job array."""

    def on_multirun_end(self, config, **kwargs) -> None:  # noqa: ANN001 - Hydra's signature
        pending, _PENDING[:] = list(_PENDING), []
        if not pending:
            return
        first = pending[0]
        folder = Path(first.launcher.log_dir or Path(first.run_dir).parent / "slurm").resolve()
        if submit_array(pending, folder):
            raise SystemExit(1)
