"""One training run, start to finish: the `Trainer` on this process's rank, or the run handed to SLURM.

`run(cfg)` returns the exit code (`trainer.runtime.exits`): 0 finished; 75 stopped by a signal or
`trainer.stop_at_step` with a checkpoint written (the same command continues); 1 failed; 2 the
command or the run directory does not fit. `dispatch` runs here (`launcher=local`, also under
torchrun or srun) or submits to SLURM; in a `-m` sweep SLURM runs are collected into one job array.
"""
from __future__ import annotations

import logging

from trainer import config as schema
from trainer.runtime import distributed
from trainer.runtime.choices import plain
from trainer.runtime.exits import EXIT_FAILED, RunFailure, UsageError, exit_code
from trainer.tracking import provenance

log = logging.getLogger(__name__)


def run(cfg: schema.TrainConfig) -> int:
    from trainer.loop import Trainer  # heavy imports after the config is known to be valid

    env = distributed.detect()
    if not distributed.is_main(env):
        logging.getLogger().setLevel(logging.WARNING)  # one rank speaks; the others only warn
    trainer, code, owned = None, EXIT_FAILED, not distributed.initialized()
    try:
        trainer = Trainer(cfg, env)
        code = trainer.fit()
    except (UsageError, RunFailure) as err:
        log.error("%s", err)
        code = exit_code(err)
    finally:
        if trainer is not None:
            trainer.close(code)
        elif owned:
            distributed.cleanup()
    return code


def dispatch(cfg: schema.TrainConfig, multirun: bool) -> int:
    """Train here (local) or hand the run to SLURM; in a `-m` sweep, SLURM runs become one array."""
    if cfg.launcher.kind == schema.LauncherKind.local:
        return run(cfg)
    from trainer.jobs import slurm

    # warn on the login node, not only once the job starts: the script Submitit writes holds the secret
    provenance.redact_config(plain(cfg), warn=True)
    if multirun:
        slurm.defer(cfg)
        return 0
    return slurm.submit(cfg)
