"""trainer/distributed.py: launch-environment detection (pure) and real 2-process gloo groups,
including a peer that dies and a peer that never joins the collective: both must error, never hang."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.runtime import distributed as D
from trainer.runtime.distributed import DistEnv, DistEnvError, detect

REPO = Path(__file__).resolve().parents[1]

# what srun exports to task 1 of `srun -N2 --ntasks-per-node=2` in job 123456 (trimmed to what matters)
SLURM_TASK = {
    "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
    "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[003-004]",
    "SLURM_JOB_ID": "123456",
}
TORCHRUN = {
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500",
}
# an sbatch batch shell: a job and even SLURM_PROCID, but no step id, because it is not an srun task
BATCH_SHELL = {
    "SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
    "SLURM_JOB_NODELIST": "node1", "SLURM_TASKS_PER_NODE": "1",
}


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def error_of(environ: dict[str, str]) -> DistEnvError:
    with pytest.raises(DistEnvError) as info:
        detect(environ)
    return info.value


# ---------------------------------------------------------------- precedence


def test_srun_task_reads_slurm_variables():
    env = detect(SLURM_TASK)
    assert env == DistEnv(rank=1, local_rank=1, world_size=4, local_world_size=2,
                          master_addr="gpu003", master_port=20_000 + 123456 % 12_000, source="slurm")


def test_slurm_beats_torchrun_beats_single():
    assert detect(SLURM_TASK | TORCHRUN).source == "slurm"
    assert detect(SLURM_TASK | TORCHRUN).rank == 1
    assert detect(TORCHRUN) == DistEnv(3, 1, 8, 4, "10.0.0.7", 29500, "torchrun")
    assert detect(BATCH_SHELL | TORCHRUN).source == "torchrun"  # torchrun started from a batch script
    alone = detect({})
    assert (alone.rank, alone.world_size, alone.master_addr, alone.source) == (0, 1, "127.0.0.1", "single")


@pytest.mark.parametrize("shell", [BATCH_SHELL, BATCH_SHELL | {"SLURM_NTASKS": "4"}, {"SLURM_JOB_ID": "5"}],
                         ids=["sbatch-ntasks1", "sbatch-ntasks4", "salloc"])
def test_plain_python_in_a_job_shell_is_single_process(shell):
    assert detect(shell).source == "single"


def test_old_step_id_spelling_counts_as_srun_task():
    assert detect(without(SLURM_TASK, "SLURM_STEP_ID") | {"SLURM_STEPID": "3"}).source == "slurm"


def test_detect_reads_os_environ_by_default(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in (*D.TORCHRUN_REQUIRED, "TORCHELASTIC_RUN_ID"):
            monkeypatch.delenv(name)
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    assert detect().rank == 3


def test_empty_values_count_as_unset():
    assert detect({"RANK": "", "SLURM_STEP_ID": ""}).source == "single"


def test_torchrun_inside_srun_is_refused():
    err = error_of(SLURM_TASK | TORCHRUN | {"TORCHELASTIC_RUN_ID": "abc"})
    assert err.variables == ("TORCHELASTIC_RUN_ID",)


# ---------------------------------------------------------------- partial environments


@pytest.mark.parametrize("present", [("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",),
                                     ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
                                     ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")])
def test_partial_torchrun_names_exactly_the_missing(present):
    err = error_of({k: TORCHRUN[k] for k in present})
    expected = tuple(k for k in D.TORCHRUN_REQUIRED if k not in present)
    assert err.variables == expected
    shown_present = ", ".join(k for k in D.TORCHRUN_REQUIRED if k in present)
    assert str(err).endswith(f"missing {', '.join(expected)} (set: {shown_present})")


@pytest.mark.parametrize("name", [*D.SLURM_REQUIRED])
def test_srun_task_missing_one_variable_is_named(name):
    err = error_of(without(SLURM_TASK, name))
    assert err.variables == (name,)
    assert f"missing {name} " in str(err)


def test_srun_task_missing_several_and_tasks_per_node():
    err = error_of({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_JOB_ID": "9"})
    assert err.variables == ("SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE")


def test_srun_task_needs_no_torchrun_variables_and_vice_versa():
    assert detect(SLURM_TASK).source == "slurm"
    assert detect(TORCHRUN).source == "torchrun"


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(("base", "name", "value"), [
    (TORCHRUN, "RANK", "one"), (TORCHRUN, "WORLD_SIZE", "2.0"), (TORCHRUN, "LOCAL_RANK", "-1"),
    (TORCHRUN, "MASTER_PORT", "http"), (TORCHRUN, "MASTER_PORT", "70000"), (TORCHRUN, "WORLD_SIZE", "0"),
    (SLURM_TASK, "SLURM_PROCID", "1a"), (SLURM_TASK, "SLURM_NTASKS", "four"),
    (SLURM_TASK, "SLURM_LOCALID", " "), (SLURM_TASK, "SLURM_JOB_ID", "123_4"),
    (SLURM_TASK, "SLURM_TASKS_PER_NODE", "2(3)"), (SLURM_TASK, "SLURM_JOB_NODELIST", "gpu[1-2"),
    (SLURM_TASK, "SLURM_JOB_NODELIST", "gpu[4-2]"), (SLURM_TASK, "MASTER_PORT", "0"),
])
def test_bad_value_names_the_variable(base, name, value):
    err = error_of(base | {name: value})
    assert err.variables == (name,)
    assert name in str(err)


@pytest.mark.parametrize(("base", "changes", "names"), [
    (TORCHRUN, {"RANK": "8"}, ("RANK", "WORLD_SIZE")),
    (TORCHRUN, {"LOCAL_RANK": "4"}, ("LOCAL_RANK", "LOCAL_WORLD_SIZE")),
    (TORCHRUN, {"LOCAL_WORLD_SIZE": "9"}, ("LOCAL_WORLD_SIZE", "WORLD_SIZE")),
    (SLURM_TASK, {"SLURM_PROCID": "4"}, ("SLURM_PROCID", "SLURM_NTASKS")),
    (SLURM_TASK, {"SLURM_LOCALID": "2"}, ("SLURM_LOCALID", "SLURM_TASKS_PER_NODE")),
    (SLURM_TASK, {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, ("SLURM_TASKS_PER_NODE", "SLURM_NTASKS")),
])
def test_inconsistent_values_name_both_variables(base, changes, names):
    assert error_of(base | changes).variables == names


def test_distenv_rejects_impossible_values():
    with pytest.raises(DistEnvError):
        DistEnv(2, 0, 2, 1, "h", 1, "torchrun")
    with pytest.raises(DistEnvError):
        DistEnv(0, 0, 2, 1, "h", 0, "torchrun")


# ---------------------------------------------------------------- Slurm strings


@pytest.mark.parametrize(("hostlist", "hosts"), [
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[003-004,010],cpu1", ["gpu003", "gpu004", "gpu010", "cpu1"]),
    ("a-b[1,3-5]", ["a-b1", "a-b3", "a-b4", "a-b5"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ("n[1-2]-ib,login", ["n1-ib", "n2-ib", "login"]),
    ("node7.cluster.org", ["node7.cluster.org"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert D.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["", "a,,b", "n[1-2", "n1-2]", "n[[1]]", "n[]", "n[a-b]", "n[3-1]", "n[1-]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        D.expand_hostlist(bad)


@pytest.mark.parametrize(("nodelist", "master"), [("gpu[003-004,010],cpu1", "gpu003"), ("a-b[3-5]", "a-b3")])
def test_master_is_first_host_of_the_step(nodelist, master):
    assert detect(SLURM_TASK | {"SLURM_JOB_NODELIST": nodelist}).master_addr == master
    # a step on part of the allocation: its own first node hosts rank 0
    step = SLURM_TASK | {"SLURM_JOB_NODELIST": "z9", "SLURM_STEP_NODELIST": nodelist}
    assert detect(step).master_addr == master


@pytest.mark.parametrize(("value", "counts"), [
    ("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3]), (" 2(x2) ", [2, 2]),
])
def test_parse_tasks_per_node(value, counts):
    assert D.parse_tasks_per_node(value) == counts


def test_uneven_tasks_per_node_picks_this_node():
    uneven = SLURM_TASK | {"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS": "7", "SLURM_PROCID": "6",
                           "SLURM_LOCALID": "0"}
    assert detect(uneven | {"SLURM_NODEID": "3"}).local_world_size == 1
    assert detect(uneven | {"SLURM_NODEID": "1"}).local_world_size == 2
    assert error_of(without(uneven, "SLURM_NODEID")).variables == ("SLURM_TASKS_PER_NODE", "SLURM_NODEID")


def test_step_tasks_per_node_beats_inherited_ntasks_per_node():
    # sbatch --ntasks-per-node=4, then `srun --ntasks-per-node=2`: the stale 4 must not win
    env = SLURM_TASK | {"SLURM_NTASKS_PER_NODE": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    assert detect(env).local_world_size == 2
    assert detect(without(SLURM_TASK, "SLURM_TASKS_PER_NODE") | {"SLURM_NTASKS_PER_NODE": "2"}) \
        .local_world_size == 2


# ---------------------------------------------------------------- ports


def test_port_derives_from_job_id_deterministically():
    ports = {job: D.slurm_port(job) for job in range(0, 200_000, 37)}
    assert all(20_000 <= p < 32_768 for p in ports.values())  # below Linux's ephemeral range
    assert D.slurm_port(123456) == D.slurm_port(123456) == 20_000 + 123456 % 12_000
    assert D.slurm_port(1000) != D.slurm_port(1001)
    tasks = [detect(SLURM_TASK | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2)}) for r in range(4)]
    assert len({(t.master_addr, t.master_port) for t in tasks}) == 1  # every task agrees, no talking


def test_master_port_overrides_the_derived_port():
    assert detect(SLURM_TASK | {"MASTER_PORT": "31337"}).master_port == 31337


def test_single_process_gets_a_free_port():
    port = detect({}).master_port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free right now


# ---------------------------------------------------------------- init without a group


def test_single_process_init_makes_no_group():
    env = detect({})
    device = D.init(env, timeout_s=5)
    try:
        assert device == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
        assert not torch.distributed.is_initialized()
        assert D.is_main()
        D.barrier()  # no-op, must not raise or block
    finally:
        D.cleanup()
        D.cleanup()


def test_init_rejects_nonpositive_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        D.init(detect({}), timeout_s=0)


def test_device_follows_local_rank_without_touching_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.select_device(1) == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match="local rank 2"):
        D.select_device(2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --gpus-per-task: one GPU per task
    assert D.select_device(3) == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.select_device(1) == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,6"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_init_on_gpu_sets_current_device():
    device = D.init(detect({}), timeout_s=5)
    assert device == torch.device("cuda:0") and torch.cuda.current_device() == 0


# ---------------------------------------------------------------- real 2-process gloo groups

# Each rank: detect() + init() from torchrun-style variables, then one all_reduce of its rank.
# mode "die": rank 1 exits right after init. mode "absent": rank 1 stays alive but skips the collective.
WORKER = r"""
import os, sys, time
import torch, torch.distributed as dist
from trainer.runtime import distributed as D

mode, timeout_s = sys.argv[1], float(sys.argv[2])
env = D.detect()
D.init(env, timeout_s=timeout_s, backend="gloo")
if env.rank == 1 and mode == "die":
    os._exit(0)
if env.rank == 1 and mode == "absent":
    time.sleep(60)
    os._exit(0)
value = torch.tensor([float(env.rank)])
start = time.monotonic()
try:
    dist.all_reduce(value)
except Exception as err:
    print(f"ALLREDUCE_ERROR {time.monotonic() - start:.2f} {type(err).__name__}: {err}", flush=True)
    os._exit(3)  # skip teardown: destroying a broken group is not what this test is about
D.barrier()
print(f"SUM {value.item():g} MAIN {D.is_main()} SOURCE {env.source}", flush=True)
D.cleanup()
"""
LAUNCH_VARS = (*D.TORCHRUN_REQUIRED, "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launch():
    """Start 2 ranks; whatever happens in the test, every process is killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(mode: str, timeout_s: float) -> list[subprocess.Popen]:
        # a clean launch environment even if pytest itself runs inside an srun step
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
        base |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")])),
                 "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        for rank in range(2):
            env = base | {"RANK": str(rank), "LOCAL_RANK": str(rank)}
            command = [sys.executable, "-c", WORKER, mode, str(timeout_s)]
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        return procs

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen, started: float, limit_s: float) -> tuple[int, str, float]:
    """Exit code, output and seconds since launch; a process still running at the limit fails the test."""
    try:
        out, _ = proc.communicate(timeout=max(0.1, started + limit_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"rank hung for more than {limit_s} s:\n{out}")
    return proc.returncode, out, time.monotonic() - started


@pytest.mark.timeout(60)
def test_two_gloo_ranks_all_reduce(launch):
    started = time.monotonic()
    rank0, rank1 = launch("ok", timeout_s=10)
    results = [finish(proc, started, 30) for proc in (rank0, rank1)]
    for rank, (code, out, _) in enumerate(results):
        assert code == 0, out
        assert f"SUM 1 MAIN {rank == 0} SOURCE torchrun" in out, out


@pytest.mark.timeout(60)
def test_dead_rank_makes_rank0_fail_fast(launch):
    started = time.monotonic()
    rank0, rank1 = launch("die", timeout_s=5)
    code1, out1, _ = finish(rank1, started, 30)
    code0, out0, elapsed = finish(rank0, started, 30)
    assert code1 == 0, out1
    assert code0 == 3, out0
    assert "ALLREDUCE_ERROR" in out0
    assert elapsed < 30


@pytest.mark.timeout(60)
def test_absent_rank_times_out_after_timeout_s(launch):
    started = time.monotonic()
    rank0, rank1 = launch("absent", timeout_s=5)
    code0, out0, elapsed = finish(rank0, started, 30)
    assert code0 == 3, out0
    waited = float(out0.split("ALLREDUCE_ERROR ")[1].split()[0])
    # the collective waited for the given timeout, not gloo's default 30 min nor an instant failure
    assert 4 <= waited < 15, out0
    assert elapsed < 30
    assert rank1.poll() is None  # rank 1 was alive all along: the timeout, not a reset, ended the wait
