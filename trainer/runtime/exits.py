"""Exit codes of every tool, the two kinds of expected failure, and the one mapping between them.

0 done. 2 (`UsageError`): the command was wrong (a bad setting, a missing path, unknown members,
a checkpoint of another model): fix the command, do not retry it. 1 (`RunFailure`): the data or the
run failed (a corrupt shard, a diverged run, a dead rank). 75 (`EXIT_PREEMPTED`): training stopped
with a checkpoint written; the same command continues it. Every error class of taxotrain derives
from one of the two bases, so `guarded` needs no list of them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": the launcher requeues a
# job that exits with this code; it means "checkpoint written, not finished".
EXIT_PREEMPTED = 75


class UsageError(Exception):
    """The command cannot work as given; exit 2. The message names the setting, file or key."""


class ConfigError(UsageError, ValueError):
    """A setting has an impossible value; the message names the key."""


def require(cond: bool, key: str, msg: str) -> None:
    """A schema's value check: `ConfigError("key: msg")` unless `cond`."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


class RunFailure(Exception):
    """The data or the run failed although the command was right; exit 1."""


def exit_code(err: BaseException) -> int | None:
    """The documented code of an expected failure; None for anything else (a bug: let it trace)."""
    if isinstance(err, UsageError):
        return EXIT_USAGE
    if isinstance(err, RunFailure):
        return EXIT_FAILED
    return None


def guarded(body: Callable[[], int], log: logging.Logger) -> int:
    """`body()`'s exit code, or the code of the error it raised, logged in one line without a traceback."""
    try:
        return body()
    except (UsageError, RunFailure) as err:
        log.error("%s", err)
        return exit_code(err)
