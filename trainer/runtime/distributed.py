"""The one module that reads the distributed environment: srun task -> torchrun -> single process.

Call `detect()` once at startup and pass the `DistEnv` on; nothing else in the project reads
`RANK`, `WORLD_SIZE` or `SLURM_*`. A half-set environment is an error, never a silent fallback:
a rank that wrongly believes it is alone trains happily while its peers wait for it forever.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

from trainer.runtime.exits import UsageError

Source = Literal["slurm", "torchrun", "single"]
_T = TypeVar("_T")

# srun sets SLURM_STEP_ID (and the old spelling SLURM_STEPID) only in the tasks of a job step. A batch
# script or an salloc shell has SLURM_JOB_ID and SLURM_NTASKS (the batch shell may even have SLURM_PROCID)
# but is not a task: Slurm's setup_env() exports the step id only when it is >= 0 as a signed int, which
# the batch, interactive and extern steps' ids are not (src/common/env.c, read, not measured here).
# So the step id, not SLURM_PROCID or SLURM_NTASKS, decides: `python train.py` in an sbatch/salloc shell
# runs as one process whatever SLURM_NTASKS says.
SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID")
SLURM_REQUIRED = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
# Most step-specific first: srun rewrites SLURM_TASKS_PER_NODE for its step, while SLURM_NTASKS_PER_NODE
# may be inherited from an sbatch `--ntasks-per-node` that this step overrode.
SLURM_TASKS_PER_NODE_VARS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
TORCHRUN_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
TORCHRUN_REQUIRED = (*TORCHRUN_RANK_VARS, "MASTER_ADDR", "MASTER_PORT")

# Ports 20000-31999: below Linux's default ephemeral range (32768-60999), so no outgoing connection on
# the node can already hold the port that every task of the job derives from the job id.
PORT_BASE = 20_000
PORT_SPAN = 12_000

_DIGITS = re.compile(r"[0-9]+")
_TASKS_ITEM = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")
_FIRST_BRACKET = re.compile(r"([^\[]*)\[([^\]]*)\](.*)")


class DistEnvError(UsageError, ValueError):
    """A partial or inconsistent launch environment; `variables` names the culprits."""

    def __init__(self, message: str, variables: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.variables = variables


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: Source

    def __post_init__(self) -> None:
        # a hand-built DistEnv that cannot work should fail here, not hang in init_process_group
        if not 0 <= self.rank < self.world_size:
            raise DistEnvError(f"rank {self.rank} outside world of {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size <= self.world_size:
            raise DistEnvError(f"local rank {self.local_rank} / local world {self.local_world_size} "
                               f"inconsistent with world {self.world_size}")
        if not 0 < self.master_port < 65536:
            raise DistEnvError(f"master port {self.master_port} outside 1-65535")


# ---------------------------------------------------------------- Slurm strings


def expand_hostlist(hostlist: str) -> list[str]:
    """`gpu[003-004,010],cpu1` -> gpu003 gpu004 gpu010 cpu1, in Slurm's order, zero padding kept."""
    hosts: list[str] = []
    for item in _split_hosts(hostlist.strip()):
        hosts += _expand_host(item)
    return hosts


def _split_hosts(hostlist: str) -> list[str]:
    """Split at the commas outside brackets (those inside separate ranges of one name)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced or nested brackets in hostlist {hostlist!r}")
        if char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    items.append(hostlist[start:])
    if depth or not all(items):
        raise ValueError(f"malformed hostlist {hostlist!r}")
    return items


def _expand_host(item: str) -> list[str]:
    match = _FIRST_BRACKET.fullmatch(item)
    if match is None:
        return [item]
    prefix, ranges, rest = match.groups()
    tails = _expand_host(rest) if rest else [""]  # names like rack[1-2]-node[1-4] have several
    return [prefix + number + tail for number in _expand_ranges(ranges) for tail in tails]


def _expand_ranges(ranges: str) -> list[str]:
    numbers: list[str] = []
    for part in ranges.split(","):
        low, dash, high = part.partition("-")
        high = high if dash else low
        if not (_DIGITS.fullmatch(low) and _DIGITS.fullmatch(high)) or int(high) < int(low):
            raise ValueError(f"bad range {part!r} in hostlist")
        # Slurm pads to the width written in the lower bound: [008-010] -> 008 009 010, [8-10] -> 8 9 10
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers


def parse_tasks_per_node(value: str) -> list[int]:
    """`2(x3),1` -> [2, 2, 2, 1]: Slurm's run-length form, one count per node of the step."""
    counts: list[int] = []
    for item in value.split(","):
        match = _TASKS_ITEM.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"bad tasks-per-node item {item!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def slurm_port(job_id: int) -> int:
    """Same port in every task of a job without any communication; differs between nearby jobs."""
    return PORT_BASE + job_id % PORT_SPAN


# ---------------------------------------------------------------- detection


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Who am I: an srun task, a torchrun worker, or a lone process (in that order of precedence)."""
    # `export RANK=` (empty) is how shells unset-by-hand; treat it as absent, not as a bad integer
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if v != ""}
    if any(name in env for name in SLURM_STEP_VARS):
        return _from_slurm(env)
    if any(name in env for name in TORCHRUN_RANK_VARS):
        return _from_torchrun(env)
    return DistEnv(0, 0, 1, 1, "127.0.0.1", _free_port(), "single")


def _from_slurm(env: dict[str, str]) -> DistEnv:
    if "TORCHELASTIC_RUN_ID" in env:
        # srun's SLURM_PROCID/SLURM_NTASKS describe the torchrun agents, not its workers: any rank we
        # derived would be wrong. One srun task per rank also survives preemption signals, which kill
        # torchrun's agent.
        raise DistEnvError("torchrun inside an srun step is not supported: launch one srun task per rank",
                           ("TORCHELASTIC_RUN_ID",))
    # when none of the three is set, the error names the one srun always exports
    tasks_var = next((name for name in SLURM_TASKS_PER_NODE_VARS if name in env), "SLURM_TASKS_PER_NODE")
    _require("srun task (SLURM_STEP_ID is set)", env, (*SLURM_REQUIRED, tasks_var))
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", minimum=1)
    job_id = _int(env, "SLURM_JOB_ID")
    local_rank, local_world = _int(env, "SLURM_LOCALID"), _local_world(env, tasks_var)
    _check(rank < world, "rank must be below the number of tasks", env, "SLURM_PROCID", "SLURM_NTASKS")
    _check(local_rank < local_world, "local rank must be below the tasks on this node", env,
           "SLURM_LOCALID", tasks_var)
    _check(local_world <= world, "more tasks on this node than in the step", env, tasks_var, "SLURM_NTASKS")
    # rank 0 hosts the rendezvous store and runs on the step's first node (block, cyclic and plane
    # distributions); the step may use fewer nodes than the job, so its own list comes first
    nodes_var = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in env else "SLURM_JOB_NODELIST"
    addr = _parse(env, nodes_var, expand_hostlist)[0]
    port = _port(env) if "MASTER_PORT" in env else slurm_port(job_id)
    return DistEnv(rank, local_rank, world, local_world, addr, port, "slurm")


def _local_world(env: dict[str, str], tasks_var: str) -> int:
    counts = _parse(env, tasks_var, parse_tasks_per_node)
    if len(set(counts)) == 1:
        return counts[0]
    node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else None
    if node is None or node >= len(counts):
        raise DistEnvError(f"{tasks_var}={env[tasks_var]!r} differs between nodes and SLURM_NODEID="
                           f"{env.get('SLURM_NODEID')!r} does not pick one", (tasks_var, "SLURM_NODEID"))
    return counts[node]


def _from_torchrun(env: dict[str, str]) -> DistEnv:
    _require("torchrun", env, TORCHRUN_REQUIRED)
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", minimum=1)
    local_rank, local_world = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE", minimum=1)
    _check(rank < world, "rank must be below world size", env, "RANK", "WORLD_SIZE")
    _check(local_rank < local_world, "local rank must be below local world size", env,
           "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    _check(local_world <= world, "local world size exceeds world size", env, "LOCAL_WORLD_SIZE", "WORLD_SIZE")
    return DistEnv(rank, local_rank, world, local_world, env["MASTER_ADDR"], _port(env), "torchrun")


def _require(launcher: str, env: dict[str, str], names: tuple[str, ...]) -> None:
    missing = tuple(name for name in names if name not in env)
    if missing:
        present = ", ".join(name for name in names if name in env) or "none"
        raise DistEnvError(f"{launcher} environment is incomplete: missing {', '.join(missing)} "
                           f"(set: {present})", missing)


def _int(env: dict[str, str], name: str, minimum: int = 0) -> int:
    raw = env[name].strip()
    if not _DIGITS.fullmatch(raw) or int(raw) < minimum:
        raise DistEnvError(f"{name}={env[name]!r} is not an integer >= {minimum}", (name,))
    return int(raw)


def _port(env: dict[str, str]) -> int:
    port = _int(env, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise DistEnvError(f"MASTER_PORT={port} is above 65535", ("MASTER_PORT",))
    return port


def _parse(env: dict[str, str], name: str, parser: Callable[[str], list[_T]]) -> list[_T]:
    try:
        return parser(env[name])
    except ValueError as err:
        raise DistEnvError(f"{name}={env[name]!r}: {err}", (name,)) from err


def _check(ok: bool, rule: str, env: dict[str, str], *names: str) -> None:
    if not ok:
        shown = ", ".join(f"{name}={env[name]!r}" for name in names)
        raise DistEnvError(f"{rule}: {shown}", names)


def _free_port() -> int:
    # only used for world size 1 (no process group), so the bind/close race does not matter
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- process group


def select_device(local_rank: int) -> torch.device:
    """`cuda:{local_rank}` when CUDA is usable, else CPU; CUDA_VISIBLE_DEVICES is left untouched."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank < count:
        return torch.device(f"cuda:{local_rank}")
    if count == 1:
        # Slurm's --gpus-per-task / --gpu-bind=single:1 show each task only its own GPU as device 0
        return torch.device("cuda:0")
    raise RuntimeError(f"local rank {local_rank} but only {count} visible GPUs: too many tasks per node")


def init(env: DistEnv, timeout_s: float, backend: str | None = None) -> torch.device:
    """Pick this rank's device and join the process group (none for a single process)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    device = select_device(env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and barrier() use the current device
    if env.world_size > 1 and not _initialized():  # a bag's members share the group of their launch
        # a short timeout turns a dead or diverged peer into an error instead of gloo's 30 min hang
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                init_method=f"tcp://{_host(env.master_addr)}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return device


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr  # an IPv6 literal needs brackets in a URL


def initialized() -> bool:
    """Whether a process group exists (one launch.bag set up for all its members, say)."""
    return _initialized()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main(env: DistEnv | None = None) -> bool:
    """The one answer to "am I rank 0": of `env` when given, else of the process group, else of the
    environment this process was launched in (so it holds before `init()` too)."""
    if env is not None:
        return env.rank == 0
    return dist.get_rank() == 0 if _initialized() else detect().rank == 0


def gather(obj: _T, everywhere: bool = False) -> list[_T] | None:
    """Every rank's `obj` in rank order: on rank 0 only (None on the others), or on every rank with
    `everywhere`; `[obj]` without a group. For small Python results (rows, problem lists, RNG
    states), not for tensors on a hot path."""
    if not _initialized():
        return [obj]
    if everywhere:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over all ranks, in place (unchanged without a group); returned for chaining."""
    if _initialized():
        dist.all_reduce(values)
    return values


def barrier() -> None:
    """Wait for every rank; a no-op without a process group, so single-process code can call it."""
    if not _initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])  # else NCCL guesses the GPU and warns
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if there is one; safe to call twice or without init()."""
    if _initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- the SLURM job around this process


@dataclass(frozen=True)
class SlurmJob:
    job_id: str           # "123", or "123_4" for array task 4 (what scontrol requeue takes)
    restarts: int         # times this job was requeued (SLURM_RESTART_COUNT)


def slurm_job(environ: Mapping[str, str] | None = None) -> SlurmJob | None:
    """The job this process runs in (batch shell or srun task), or None outside SLURM."""
    env = os.environ if environ is None else environ
    if not env.get("SLURM_JOB_ID"):
        return None
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    return SlurmJob(job_id, int(restarts) if restarts.isdigit() else 0)
