"""Smoke tests of the local two-node SLURM cluster (scripts/slurm_cluster.sh) and the tests' helpers."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import (  # noqa: F401  (slurm_cluster: the fixture, used through usefixtures)
    job_info,
    job_output,
    requeue,
    sbatch,
    slurm_cluster,
    wait_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return path


def test_two_nodes_one_task_each(tmp_path: Path) -> None:
    script = write_script(tmp_path / "job.sh", (
        'echo "nodelist=$SLURM_JOB_NODELIST ntasks=$SLURM_NTASKS"\n'
        "srun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME host $(hostname)\"'\n"
    ))
    job = sbatch("--nodes=2", "--ntasks-per-node=1", "--time=1", f"--chdir={tmp_path}",
                 f"--output={tmp_path}/%j.out", script, env={"TAXOTRAIN_PROBE": "yes"})
    info = wait_job(job)
    out = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out)
    assert info["NodeList"] == "node[1-2]"
    assert "nodelist=node[1-2] ntasks=2" in out
    tasks = sorted(line.split(" host ")[0] for line in out.splitlines() if line.startswith("task "))
    assert tasks == ["task 0 on node1", "task 1 on node2"], out


def test_requeue_runs_again_with_restart_count(tmp_path: Path) -> None:
    # first run: waits to be requeued; second run (SLURM_RESTART_COUNT=1): finishes at once
    script = write_script(tmp_path / "requeue.sh", (
        'echo "run restart=${SLURM_RESTART_COUNT:-0}"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 120; fi\n'
        "echo done\n"
    ))
    job = sbatch("--requeue", "--open-mode=append", "--time=3", f"--output={tmp_path}/%j.out", script)
    out_file = tmp_path / f"{job}.out"
    wait_job(job, states=frozenset({"RUNNING"}))
    deadline = time.monotonic() + 10
    while "run restart=0" not in (out_file.read_text() if out_file.exists() else ""):
        assert time.monotonic() < deadline, job_info(job)
        time.sleep(0.1)
    requeue(job)
    info = wait_job(job)
    out = out_file.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    assert "run restart=0" in out and "run restart=1" in out and out.rstrip().endswith("done"), out
    assert "DUE TO JOB REQUEUE" in out, job_output(info)


def test_unknown_partition_is_refused() -> None:
    proc = subprocess.run(["sbatch", "--parsable", "-p", "nosuch", "--wrap", "true"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "invalid partition specified: nosuch" in proc.stderr, proc.stderr
