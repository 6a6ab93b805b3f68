"""Training on the real two-node SLURM cluster (scripts/slurm_cluster.sh): sbatch and Submitit paths,
preemption and time limits with requeue, job arrays, and bad input refused before anything is queued.

Every job runs 2 ranks (node1, node2: one CPU each) with gloo. Final weights after a preemption are
compared bit for bit with an uninterrupted run of the same configuration.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import submitit
from slurm_cluster import job_info, sbatch, slurm, wait_job, wait_job_hurrying_requeues
from train_fixtures import assert_same_training_state, final_state, metrics, write_shardset

REPO = Path(__file__).resolve().parents[1]
UNEVEN = {"train": [37, 5, 22, 3, 30, 11, 2, 19], "val": [13, 4, 9]}
STEPS = 40  # 129 samples, 2 ranks x batch 4: 16 steps per epoch, so stops land mid-epoch
TRAIN = ["model.name=mobilenet_v3_small", "data.crop_size=16", "data.scale=[0.5,1.0]", "loader.batch_size=4",
         "loader.workers=1", "loader.pin_memory=false", "optim.base_lr=0.05", "schedule.warmup_epochs=0.5",
         "trainer.log_every=1", "trainer.dist_timeout_s=60", f"trainer.max_steps={STEPS}"]

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shardset(tmp_path_factory.mktemp("shards"), UNEVEN)


def submit_sbatch(run_dir: Path, shards: Path, *extra: str, options: tuple[str, ...] = ()) -> int:
    env = {**os.environ, "PYTHON": sys.executable}
    script = str(REPO / "slurm" / "train.sbatch")
    return sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={run_dir}.%j.out",
                  *options, script, f"data.shards={shards}", f"run_dir={run_dir}", *TRAIN, *extra, env=env)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def submitit_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return ["launcher=slurm", "launcher.nodes=2", "launcher.cpus_per_task=1", f"data.shards={shards}",
            f"run_dir={run_dir}", *TRAIN, *extra]


def wait_for_training(run_dir: Path, job: int, timeout: float = 180) -> None:
    """Until the run has logged an optimizer step (so a signal lands inside training, mid-epoch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and '"split": "train"' in path.read_text():
            return
        if job_info(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job} ended before training: {job_info(job)}")
        time.sleep(0.2)
    pytest.fail(f"job {job}: no training step logged in {timeout}s")


def preempt_and_finish(job: int) -> dict:
    """USR2 to the job's tasks, as SLURM does before a preemption; the job requeues itself.

    No StartTime=now here: a requeued batch job started before its old credential expires is killed
    ("Job credential revoked"); the test cluster's cred_expire=20 restarts it after ~20 s by itself.
    """
    slurm("scancel", "--signal=USR2", str(job))
    return wait_job(job)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-node run through slurm/train.sbatch."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    info = wait_job(submit_sbatch(run_dir, shards, "logger.mode=offline"))
    assert info["JobState"] == "COMPLETED", info
    return run_dir


def test_sbatch_two_nodes_trains_with_one_writer(reference):
    state = final_state(reference)
    assert state["step"] == STEPS and state["recipe"]["world_size"] == 2
    assert state["position"]["world"] == 2
    lines = [m for m in metrics(reference) if m["split"] == "train"]
    steps = [m["step"] for m in lines if "lr" in m]
    assert steps == list(range(1, STEPS + 1))  # exactly one rank writes metrics: no step twice
    assert len(list((reference / "wandb").glob("offline-run-*"))) == 1  # and one W&B run
    job = next(m for m in metrics(reference) if m["split"] == "job")
    assert job["requeues"] == 0


def test_sbatch_preemption_checkpoints_requeues_and_ends_bitwise_equal(reference, shards, tmp_path):
    run_dir = tmp_path / "run"
    job = submit_sbatch(run_dir, shards, "logger.mode=disabled")
    wait_for_training(run_dir, job)
    info = preempt_and_finish(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert [m["requeues"] for m in metrics(run_dir) if m["split"] == "job"] == [0, 1]
    resumed_at = [m["step"] for m in metrics(run_dir) if m["split"] == "job"][1]
    assert 0 < resumed_at < STEPS and resumed_at % 16 != 0  # stopped inside an epoch
    assert_same_training_state(final_state(reference), final_state(run_dir))


def test_submitit_finishes_and_the_result_reads_back(shards, tmp_path):
    run_dir = tmp_path / "run"
    done = cli(*submitit_args(run_dir, shards, "launcher.wait=true", "trainer.max_steps=6",
                              "data.val_split=null", "logger.mode=disabled"))
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", done.stdout)[1]
    assert "every task returned normally" in done.stdout
    job = submitit.SlurmJob(run_dir / "slurm", job_id, tasks=(0, 1))
    assert job.results() == [0, 0]
    assert final_state(run_dir)["step"] == 6 and final_state(run_dir)["recipe"]["world_size"] == 2


def test_submitit_preemption_requeues_and_ends_bitwise_equal(reference, shards, tmp_path):
    run_dir = tmp_path / "run"
    done = cli(*submitit_args(run_dir, shards, "logger.mode=disabled"))
    assert done.returncode == 0, done.stdout + done.stderr
    job = int(re.search(r"submitted SLURM job (\d+)", done.stdout)[1])
    wait_for_training(run_dir, job)
    info = preempt_and_finish(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert [m["requeues"] for m in metrics(run_dir) if m["split"] == "job"] == [0, 1]
    assert_same_training_state(final_state(reference), final_state(run_dir))


def test_time_limit_checkpoints_and_requeues_until_done(shards, tmp_path):
    run_dir = tmp_path / "run"
    # 2 minutes per start, USR2 60 s before the end (SLURM may send it up to 60 s earlier still): each
    # start trains for under a minute (25-55 s, 10-24 steps on a busy 2-core machine), and ResNet-18 at
    # 32 px needs more than one start for 80 steps even on a machine twice as fast
    job = submit_sbatch(run_dir, shards, "trainer.max_steps=80", "trainer.log_every=10",
                        "model.name=resnet18", "data.crop_size=32", "loader.batch_size=8",
                        "logger.mode=disabled", "loader.workers=0", "data.val_split=null",
                        options=("--time=2", "--signal=USR2@60", "--export=ALL,MAX_REQUEUES=30"))
    info = wait_job_hurrying_requeues(job, timeout=1500)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    starts = [m["step"] for m in metrics(run_dir) if m["split"] == "job"]
    assert len(starts) == int(info["Restarts"]) + 1
    assert starts == sorted(starts) and starts[1] > 0  # every start resumed; none began again at 0
    assert final_state(run_dir)["step"] == 80


def test_sweep_runs_as_one_array_of_two_jobs(shards, tmp_path):
    done = cli("-m", *submitit_args(tmp_path / "${trainer.seed}", shards, "trainer.seed=0,1",
                                    "trainer.max_steps=4", "data.val_split=null", "logger.mode=disabled",
                                    "loader.workers=0", "launcher.wait=true",
                                    f"hydra.sweep.dir={tmp_path}/sweeps"))  # multirun.yaml, not in the repo
    assert done.returncode == 0, done.stdout + done.stderr
    ids = re.search(r"submitted SLURM job array of 2: \[(.*)\]", done.stdout)[1]
    assert re.fullmatch(r"'(\d+)_0', '\1_1'", ids), ids  # one array job id, tasks 0 and 1
    assert final_state(tmp_path / "0")["step"] == final_state(tmp_path / "1")["step"] == 4
    assert final_state(tmp_path / "1")["config"]["trainer"]["seed"] == 1


def jobs_named(name: str) -> list[str]:
    """Every job slurmctld knows by this name, finished ones included (kept for MinJobAge)."""
    lines = slurm("scontrol", "-o", "show", "jobs").stdout.splitlines()
    return [line for line in lines if f" JobName={name} " in f" {line} "]


@pytest.mark.parametrize(("override", "message"), [
    ("launcher.partition=nosuch", "launcher.partition='nosuch' does not exist"),
    ("data.shards={missing}", "data.shards"),
    ("launcher.nodes=0", "launcher.nodes"),
])
def test_bad_input_fails_before_anything_is_queued(shards, tmp_path, override, message):
    name = f"refused-{tmp_path.name}"
    args = submitit_args(tmp_path / "run", shards, f"launcher.job_name={name}")
    done = cli(*args, override.format(missing=tmp_path / "none"), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout + done.stderr
    assert jobs_named(name) == [] and not (tmp_path / "run").exists()


def test_dry_run_prints_the_script_and_submits_nothing(shards, tmp_path):
    name = f"dry-{tmp_path.name}"
    done = cli(*submitit_args(tmp_path / "run", shards, "launcher.dry_run=true", f"launcher.job_name={name}"),
               timeout=60)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=2" in done.stdout and "#SBATCH --signal=USR2@120" in done.stdout
    assert "--wait=60" in done.stdout and "#SBATCH --requeue" in done.stdout
    run_dir = (tmp_path / "run").resolve()
    assert "#SBATCH --array" not in done.stdout and f"one job: run_dir={run_dir}" in done.stdout
    assert f"--output {run_dir}/slurm/%j_%t_log.out" in done.stdout  # the real log folder, not the stand-in
    assert jobs_named(name) == []
    assert not (tmp_path / "run").exists()  # no Submitit files in run_dir/slurm either


class TestDryRunWithoutTheCluster:
    """A dry run submits through a stub sbatch, so it needs no cluster: these run anywhere.

    A trap `sbatch` first on the command's PATH proves that the stub shadowed whatever sbatch is there.
    """

    @pytest.fixture
    def slurm_cluster(self) -> None:
        """Overrides the module's cluster fixture: nothing here reaches SLURM."""

    @staticmethod
    def dry_run(module: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
        trap = tmp_path / "trap"
        trap.mkdir()
        (trap / "sbatch").write_text(f"#!/bin/sh\ntouch {trap}/called\nexit 1\n")
        (trap / "sbatch").chmod(0o755)
        env = {**os.environ, "PATH": f"{trap}{os.pathsep}{os.environ['PATH']}"}
        command = [sys.executable, "-m", module, *args, "launcher=slurm", "launcher.dry_run=true"]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not (trap / "called").exists()
        return done

    def test_a_bag_prints_the_array_script_and_each_members_run(self, shards, tmp_path):
        bag = tmp_path / "bag"
        done = self.dry_run("launch.bag", tmp_path, "bag.members=2", f"data.shards={shards}",
                            f"run_dir={bag}", *TRAIN, "bag.models=[resnet18,mobilenet_v3_small]")
        bag = bag.resolve()
        assert "#SBATCH --array=0-1%2" in done.stdout and "#SBATCH --requeue" in done.stdout
        assert f"--output {bag}/slurm/%A_%a_%t_log.out" in done.stdout
        # each member's readable W&B name travels with it (trainer/jobs/bag.py)
        assert f"task 0: run_dir={bag}/member-00 data.bootstrap_member=0 logger.name=bag/member-00 " \
            "model.name=resnet18 trainer.seed=0" in done.stdout
        assert f"task 1: run_dir={bag}/member-01 data.bootstrap_member=1 logger.name=bag/member-01 " \
            "model.name=mobilenet_v3_small trainer.seed=1" in done.stdout
        assert not bag.exists()  # no bag.json, no Submitit files

    def test_a_sweep_prints_the_array_script_and_each_points_run(self, shards, tmp_path):
        done = self.dry_run("launch.train", tmp_path, "-m", f"data.shards={shards}", *TRAIN,
                            f"run_dir={tmp_path}/${{trainer.seed}}", "trainer.seed=0,1",
                            f"hydra.sweep.dir={tmp_path}/sweeps")
        assert "#SBATCH --array=0-1%2" in done.stdout
        assert f"--output {tmp_path.resolve()}/slurm/%A_%a_%t_log.out" in done.stdout
        for seed in (0, 1):
            assert f"task {seed}: run_dir={tmp_path.resolve()}/{seed} trainer.seed={seed}\n" in done.stdout
        assert not (tmp_path / "slurm").exists() and not (tmp_path / "0").exists()

    def test_off_the_cluster_only_a_dry_run_is_allowed(self, tmp_path, monkeypatch, capsys):
        from trainer.config import Backend, LauncherConfig, LauncherKind, LoaderConfig, TrainConfig
        from trainer.jobs import slurm as jobs
        from trainer.runtime.exits import ConfigError

        monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no srun
        launcher = LauncherConfig(kind=LauncherKind.slurm, partition="gpu", dry_run=True)
        cfg = TrainConfig(run_dir=str(tmp_path / "run"), launcher=launcher,
                          loader=LoaderConfig(backend=Backend.synthetic))
        assert jobs.submit(cfg) == 0
        assert "#SBATCH --partition=gpu" in capsys.readouterr().out and not (tmp_path / "run").exists()
        with pytest.raises(ConfigError, match="no sbatch"):
            jobs.submit(replace(cfg, launcher=replace(launcher, dry_run=False)))


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The training process of `rank` for this run (found through its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except (OSError, PermissionError):
            continue
        if f"run_dir={run_dir}".encode() in cmdline and f"SLURM_PROCID={rank}\0".encode() in environ \
                and b"launch.train" in cmdline:
            return int(proc.name)
    return None


def test_a_crashed_task_ends_the_whole_job(shards, tmp_path):
    run_dir = tmp_path / "run"
    job = submit_sbatch(run_dir, shards, "trainer.max_steps=100000", "trainer.epochs=1000",
                        "logger.mode=disabled", "loader.workers=0")
    wait_for_training(run_dir, job)
    pid = rank_pid(run_dir, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    info = wait_job(job, timeout=120)  # rank 0 errors (gloo) or srun --wait ends it: no rank left waiting
    assert info["JobState"] == "FAILED", info


def test_bag_sbatch_trains_one_member_per_array_task(shards, tmp_path):
    bag = tmp_path / "bag"
    job = sbatch("--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1",
                 f"--output={tmp_path}/%A_%a.out", str(REPO / "slurm" / "bag.sbatch"), "bag.members=2",
                 f"data.shards={shards}", f"run_dir={bag}", *TRAIN, "trainer.max_steps=3",
                 "data.val_split=null", "logger.mode=disabled", "loader.workers=0",
                 env={**os.environ, "PYTHON": sys.executable})
    for task in (0, 1):
        info = wait_job(f"{job}_{task}")
        assert info["JobState"] == "COMPLETED", info
    members = [m["name"] for m in json.loads((bag / "bag.json").read_text())["members"]]
    assert members == ["member-00", "member-01"]
    states = [final_state(bag / name) for name in members]
    assert [s["step"] for s in states] == [3, 3]
    assert [s["config"]["data"]["bootstrap_member"] for s in states] == [0, 1]


def test_evaluate_sbatch_on_two_nodes_counts_every_sample_once(reference, shards, tmp_path):
    job = sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={tmp_path}/%j.out",
                 str(REPO / "slurm" / "evaluate.sbatch"), f"bag={reference}", f"data.shards={shards}",
                 "data.split=val", "workers=1", f"out={tmp_path}/eval",
                 env={**os.environ, "PYTHON": sys.executable})
    info = wait_job(job)
    assert info["JobState"] == "COMPLETED", info
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["ensemble"]["n"] == sum(UNEVEN["val"])
    # the same numbers as one process: every sample once, confusion counts merged across the nodes
    from trainer.inference.config import EvalData, EvaluateConfig
    from trainer.inference.evaluate import run as run_evaluate

    assert run_evaluate(EvaluateConfig(bag=str(reference), data=EvalData(str(shards), "val"), workers=0,
                                       plots=False, out=str(tmp_path / "one"))) == 0
    alone = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report["confusion"] == alone["confusion"]
    assert [r["support"] for r in report["per_class"]] == [r["support"] for r in alone["per_class"]]
    for key in ("top1", "top5", "mrr", "macro_top5"):
        assert report["ensemble"][key] == alone["ensemble"][key]
    assert report["ensemble"]["nll"] == pytest.approx(alone["ensemble"]["nll"], rel=1e-9)
