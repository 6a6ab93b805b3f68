"""Helpers for tests marked `slurm`: a real two-node cluster on this machine (scripts/slurm_cluster.sh).

    from slurm_cluster import sbatch, wait_job

    @pytest.mark.slurm
    @pytest.mark.usefixtures("slurm_cluster")
    def test_x(tmp_path):
        job = sbatch("--nodes=2", f"--output={tmp_path}/%j.out", "--wrap", "srun hostname")
        assert wait_job(job)["JobState"] == "COMPLETED"

Outside CI a cluster that cannot be started (not root, no apt) skips the test; with CI=true it fails it.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# default waits include queueing: the two 1-CPU nodes are shared with whatever else was submitted
QUEUE_S = 300.0
TERMINAL = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "DEADLINE",
     "BOOT_FAIL"}
)
_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def slurm(*args: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client command; with check, a non-zero exit fails the test with its output."""
    cmd = [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


@functools.cache
def _start() -> tuple[bool, str]:
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{SCRIPT} start: {exc}"
    return proc.returncode == 0, f"{SCRIPT} start exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def ensure_cluster() -> None:
    """Start the cluster once per session; skip (outside CI) or fail (CI=true) when it cannot start."""
    ok, output = _start()
    if ok:
        return
    if in_ci():
        pytest.fail(f"SLURM test cluster did not start (CI=true, so this is a failure):\n{output}")
    pytest.skip(f"no SLURM test cluster: {output.strip().splitlines()[-1]}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    ensure_cluster()
    yield


def sbatch(*args: str | Path, env: Mapping[str, str] | None = None) -> int:
    """Submit with `sbatch --parsable ARGS` (env: extra variables, exported to the job); return the job id."""
    cmd = ["sbatch", "--parsable", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return int(proc.stdout.strip().split(";")[0])


def parse_job(line: str) -> dict[str, str]:
    """`scontrol show job -o` output -> {"JobState": "RUNNING", "Restarts": "0", ...}."""
    keys = list(_KEY.finditer(line))
    return {m.group(1): line[m.end():nxt.start() if nxt else None].strip()
            for m, nxt in zip(keys, [*keys[1:], None])}


def job_info(job_id: int) -> dict[str, str]:
    """The job as `scontrol show job` sees it ({} once it has aged out, after MinJobAge)."""
    proc = slurm("scontrol", "show", "job", "-o", str(job_id), check=False)
    if proc.returncode != 0 and "Invalid job id" in proc.stderr:
        return {}
    if proc.returncode != 0:
        pytest.fail(f"scontrol show job {job_id}: {proc.stderr}")
    return parse_job(proc.stdout.strip())


def job_output(info: Mapping[str, str], lines: int = 40) -> str:
    """The last lines of the job's StdOut file ('' when it is missing)."""
    path = Path(info.get("StdOut", ""))
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_job(job_id: int, timeout: float = QUEUE_S, states: frozenset[str] = TERMINAL) -> dict[str, str]:
    """Poll until the job's JobState is in `states` (default: finished); on timeout cancel it and fail."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if not info:
            pytest.fail(f"job {job_id} is no longer known to slurmctld")
        if info.get("JobState") in states:
            return info
        if time.monotonic() > deadline:
            slurm("scancel", str(job_id), check=False)
            pytest.fail(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s: {info}\n"
                        f"--- output ---\n{job_output(info)}")
        time.sleep(0.25)


REVOKE_MARGIN_S = 2.0  # seconds a requeued job pends before its forced restart: see requeue_now


def wait_job_hurrying_requeues(job_id: int, timeout: float = QUEUE_S) -> dict[str, str]:
    """`wait_job` for a job that requeues itself (a time limit): each time it pends again, `requeue_now`
    skips its BeginTime wait (cred_expire + 1 s), so each restart costs the restart, not the wait. The
    job still signals, checkpoints and requeues itself: only the queue is hurried."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(1.0, deadline - time.monotonic())
        info = wait_job(job_id, left, TERMINAL | {"PENDING"})
        if info["JobState"] in TERMINAL:
            return info
        requeue_now(job_id, int(info.get("Restarts", "0")), max(1.0, deadline - time.monotonic()))


def requeue(job_id: int, timeout: float = QUEUE_S) -> dict[str, str]:
    """`scontrol requeue` a running job, then requeue_now: returns its info once it runs again."""
    restarts = int(job_info(job_id).get("Restarts", "0"))
    slurm("scontrol", "requeue", str(job_id))
    return requeue_now(job_id, restarts=restarts + 1, timeout=timeout)


def requeue_now(job_id: int, restarts: int = 1, timeout: float = QUEUE_S) -> dict[str, str]:
    """Once the job has been requeued (Restarts >= `restarts`, by `scontrol requeue` or by the job itself),
    skip the BeginTime wait (StartTime=now) while it pends; return its info once it runs again or ended.

    Not at once: slurmd refuses a batch credential created in the same second as the one it revoked
    when it killed the old run ("Job credential revoked", the job ends FAILED), which a start within
    the requeue's second hit on this machine. The job pends again only once the old run is gone, so
    a start `REVOKE_MARGIN_S` after it is first seen pending gets a strictly later credential."""
    deadline = time.monotonic() + timeout
    pending_since: float | None = None
    while True:
        info = job_info(job_id)
        state = info.get("JobState", "")
        if int(info.get("Restarts", "0")) >= restarts:
            if state == "RUNNING" or state in TERMINAL:
                return info
            if state == "PENDING":
                pending_since = pending_since or time.monotonic()
                if time.monotonic() - pending_since >= REVOKE_MARGIN_S:
                    slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        if time.monotonic() > deadline:
            slurm("scancel", str(job_id), check=False)
            pytest.fail(f"job {job_id} not run again (Restarts>={restarts}) in {timeout:.0f}s: {info}\n"
                        f"--- output ---\n{job_output(info)}")
        time.sleep(0.25)
