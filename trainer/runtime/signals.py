"""Stop requests (preemption signals) and the step-boundary agreement of all ranks.

The handler only sets a flag: checkpointing inside a signal handler would run in the middle of a
collective. At the next step boundary every rank contributes its status to one `all_reduce(MAX)`,
so a signal delivered to rank 0 alone (SLURM's `--signal` goes to the batch step or to some tasks)
still stops all ranks at the same step, and a rank whose data failed stops its peers instead of
leaving them blocked in the next gradient all-reduce.
"""
from __future__ import annotations

import atexit
import logging
import signal
from collections.abc import Iterable, Sequence
from enum import IntEnum
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# no torch at import time: `listen_early()` runs before the heavy imports of a starting job
log = logging.getLogger(__name__)
EARLY_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")
_early: set[str] = set()  # signals received before the trainer's StopFlag existed



class Status(IntEnum):
    RUN = 0
    STOP = 1    # a stop was requested (signal, stop_at_step): checkpoint and exit EXIT_PREEMPTED
    FAILED = 2  # some rank failed (e.g. its data): every rank exits with an error


def listen_early(names: Iterable[str] = EARLY_SIGNALS) -> None:
    """Record preemption signals from process start on: Python's default action for SIGUSR1/2 and
    SIGTERM kills the process, and SLURM may signal a job while it is still importing torch."""
    def record(signum: int, _frame: FrameType | None) -> None:
        _early.add(signal.Signals(signum).name)

    for name in names:
        signal.signal(signal.Signals[name], record)
    atexit.register(_ignore_at_exit, tuple(names))


def _ignore_at_exit(names: tuple[str, ...]) -> None:
    """From the last atexit call on, these signals are ignored. Interpreter finalisation resets every
    Python-handled signal to its default action (kill) but leaves an ignored one ignored: a SLURM
    `--signal` that lands while torch and gloo shut down after the run's work (checkpoint included) is
    done would otherwise kill the task, and turn a finished job into a FAILED one."""
    for name in names:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


class StopFlag:
    """Installs handlers for the named signals; `requested` turns true when one arrives (or arrived
    before, while `listen_early` was recording)."""

    def __init__(self, signals: Sequence[str]) -> None:
        pending = sorted(_early.intersection(signals))
        self.requested = bool(pending)
        self.received: str | None = pending[0] if pending else None
        self._previous: dict[signal.Signals, object] = {}
        for name in signals:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.requested = True
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def agree(status: Status, device: torch.device) -> Status:
    """The highest status of all ranks (one small all_reduce); the local status without a group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return status
    flag = torch.tensor([int(status)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return Status(int(flag.item()))
