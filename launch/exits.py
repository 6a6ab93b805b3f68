"""Exit codes of every entry point, and the one mapping from errors to them.

0 done; 1 the data or the run failed (`DataError`: a corrupt shard, a diverged run); 2 the command
was wrong (a bad setting, a missing path, unknown members): fix the command, do not retry it.
Training adds 75 (`trainer.preempt.EXIT_PREEMPTED`): stopped, resumable.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from shards.config import ConfigError
from trainer.data import DataError
from trainer.distributed import DistEnvError
from trainer.model import ModelError
from trainer.shardset import ShardSetError

EXIT_FAILED, EXIT_USAGE = 1, 2
USAGE_ERRORS: tuple[type[Exception], ...] = (ConfigError, DistEnvError, ModelError, ShardSetError)


def guarded(body: Callable[[], int], log: logging.Logger,
            usage: tuple[type[Exception], ...] = USAGE_ERRORS) -> int:
    """`body()`'s exit code, or the code of the error it raised, logged in one line without a traceback."""
    try:
        return body()
    except usage as err:
        log.error("%s", err)
        return EXIT_USAGE
    except DataError as err:
        log.error("%s", err)
        return EXIT_FAILED
