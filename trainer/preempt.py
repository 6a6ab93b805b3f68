"""Stop requests (preemption signals) and the step-boundary agreement of all ranks.

The handler only sets a flag: checkpointing inside a signal handler would run in the middle of a
collective. At the next step boundary every rank contributes its status to one `all_reduce(MAX)`,
so a signal delivered to rank 0 alone (SLURM's `--signal` goes to the batch step or to some tasks)
still stops all ranks at the same step, and a rank whose data failed stops its peers instead of
leaving them blocked in the next gradient all-reduce.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from enum import IntEnum
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": the launcher requeues a
# job that exits with this code; it means "checkpoint written, not finished".
EXIT_PREEMPTED = 75


class Status(IntEnum):
    RUN = 0
    STOP = 1    # a stop was requested (signal, stop_at_step): checkpoint and exit EXIT_PREEMPTED
    FAILED = 2  # some rank failed (e.g. its data): every rank exits with an error


class StopFlag:
    """Installs handlers for the named signals; `requested` turns true when one arrives."""

    def __init__(self, signals: Sequence[str]) -> None:
        self.requested = False
        self.received: str | None = None
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
    if not (dist.is_available() and dist.is_initialized()):
        return status
    flag = torch.tensor([int(status)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return Status(int(flag.item()))
