"""`python -m launch.train data.shards=DIR run_dir=DIR`: in-process, torchrun, or one srun task per rank;
with `launcher=slurm`, submits the same run to SLURM through Submitit (launch/slurm.py).

Exit codes: 0 finished; 75 (`EXIT_PREEMPTED`) stopped by a signal or `trainer.stop_at_step` with a
checkpoint written (run the same command again to continue); 1 failed; 2 bad configuration or data.
"""
# ruff: noqa: E402 - the preemption signals are recorded before the heavy imports below
from __future__ import annotations

from trainer import preempt

preempt.listen_early()  # before the heavy imports: a signal now must not kill the job unrecorded

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launch.exits import EXIT_FAILED, EXIT_USAGE, USAGE_ERRORS
from shards.config import ConfigError
from trainer import config as schema
from trainer import distributed

log = logging.getLogger("launch.train")

schema.register()


def run(cfg: schema.TrainConfig) -> int:
    from trainer.data import DataError  # heavy imports after the config is known to be valid
    from trainer.loop import Trainer

    env = distributed.detect()
    if env.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank speaks; the others only warn
    trainer, code, owned = None, EXIT_FAILED, not distributed.initialized()
    try:
        trainer = Trainer(cfg, env)
        code = trainer.fit()
    except (*USAGE_ERRORS, DataError) as err:
        log.error("%s", err)
        code = EXIT_USAGE if isinstance(err, USAGE_ERRORS) else EXIT_FAILED
    finally:
        if trainer is not None:
            trainer.close(code)
        elif owned:
            distributed.cleanup()
    return code


def dispatch(cfg: schema.TrainConfig, multirun: bool) -> int:
    """Train here (local) or hand the run to SLURM; in a `-m` sweep, SLURM runs become one array."""
    if cfg.launcher.kind == "local":
        return run(cfg)
    from launch import slurm

    if multirun:
        slurm.defer(cfg)
        return 0
    return slurm.submit(cfg)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(raw: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        cfg = OmegaConf.to_object(raw)  # runs every __post_init__ check before any work
        code = dispatch(cfg, multirun)
    except ConfigError as err:
        log.error("%s", err)
        code = EXIT_USAGE
    if multirun and code in (0, None):
        return  # the sweep goes on; a failed point still ends the sweep with its code below
    sys.exit(code)


if __name__ == "__main__":
    main()
