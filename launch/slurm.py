"""`launcher=slurm`: submit training to SLURM through Submitit, one srun task per rank.

Preemption and time limits: SLURM sends `launcher.signal` to every task `launcher.signal_lead_s`
before the end; the trainer's handler only sets a flag, all ranks stop at the next step and write a
checkpoint, and the training process returns `EXIT_PREEMPTED`. Rank 0 then requeues the job with
`scontrol requeue` (at most `launcher.max_requeues` times); the requeued job runs the same pickled
task, which resumes from the newest checkpoint in `run_dir`. Submitit's own signal handler, which
would checkpoint from inside the handler, is replaced by the trainer's as soon as training starts.

`-m` sweeps with `launcher=slurm`: every sweep point is collected and `ArrayCallback` submits them
together as one job array when the sweep ends.
"""
from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import submitit
from hydra.experimental.callback import Callback

from shards.config import ConfigError
from trainer import distributed, shardset
from trainer.config import LauncherConfig, TrainConfig
from trainer.preempt import EXIT_PREEMPTED

log = logging.getLogger("launch.slurm")
_PENDING: list[TrainConfig] = []  # sweep points waiting for ArrayCallback


class TrainTask:
    """What every srun task runs (pickled by Submitit): train, and on a stop, requeue the job."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> int:
        from launch.train import run  # the node imports torch, not the login node that pickled us

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
    if distributed.detect().rank == 0:
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
    """What can be known on the login node fails here, naming the setting, before a job waits in queue."""
    if shutil.which("sbatch") is None:
        raise ConfigError("launcher=slurm: no sbatch on this machine (run from a SLURM login node)")
    if cfg.loader.backend != "synthetic":
        try:
            shardset.read_info(Path(cfg.data.shards).expanduser())
        except shardset.ShardSetError as err:
            raise ConfigError(f"data.shards: {err}") from err
    if cfg.launcher.partition:
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
    ex = executor(cfg.launcher, log_folder(cfg))
    if cfg.launcher.dry_run:
        print(dry_run_script(ex))
        return 0
    job = ex.submit(TrainTask(cfg))
    print(f"submitted SLURM job {job.job_id}\n  run_dir: {cfg.run_dir}\n  logs:    {job.paths.stdout}")
    return _wait(job) if cfg.launcher.wait else 0


def dry_run_script(ex: submitit.SlurmExecutor) -> str:
    return ex._make_submission_file_text(ex._submitit_command_str, "DRY-RUN")  # what submit() would send


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
    ex = executor(first.launcher, folder)
    if first.launcher.dry_run:
        print(dry_run_script(ex))
        print(f"dry run: {len(cfgs)} array tasks; run_dirs: {[c.run_dir for c in cfgs]}")
        return 0
    with ex.batch():
        jobs = [ex.submit(TrainTask(c)) for c in cfgs]
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
