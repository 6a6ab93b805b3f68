"""A bag of K members: each an ordinary, resumable training run in `run_dir/member-XX`.

Member i trains with seed `bag.seed * 1000 + i`; with `bag.strategy=bootstrap` also on its own
Poisson(1) bootstrap resample of the training split (`trainer/data/streams.py: bootstrap_count`),
and `bag.models` can give members different architectures. `run_dir/bag.json` lists the members.
Locally the members train one after the other (each with all ranks, under torchrun or srun); with
`launcher=slurm` they go out as one job array; `bag.only=i` trains member i alone.
"""
from __future__ import annotations

import json
import logging
from dataclasses import fields, replace
from pathlib import Path

from trainer import config as schema
from trainer.jobs.run import run
from trainer.runtime import distributed
from trainer.runtime.files import atomic_write
from trainer.tracking import identity

log = logging.getLogger(__name__)
BAG_FILE = "bag.json"


def member_name(index: int) -> str:
    return f"member-{index:02d}"


def member_config(cfg: schema.BagRunConfig, index: int) -> schema.TrainConfig:
    """Member `index` of the bag: its own run directory, seed, resample and (optionally) architecture."""
    bag = cfg.bag
    model = replace(cfg.model, name=bag.models[index % len(bag.models)]) if bag.models else cfg.model
    data = replace(cfg.data, bootstrap_member=index if bag.strategy == schema.BagStrategy.bootstrap else None,
                   bootstrap_seed=bag.seed)
    trainer = replace(cfg.trainer, seed=bag.seed * 1000 + index)
    return replace(training_part(cfg), model=model, data=data, trainer=trainer,
                   logger=member_logger(cfg, index), run_dir=str(Path(cfg.run_dir) / member_name(index)))


def member_logger(cfg: schema.BagRunConfig, index: int) -> schema.LoggerConfig:
    """W&B shows the bag as one group of readable runs (`<bag>/member-01`). Filled in here, before a
    SLURM submission, so that each member's config.yaml records them (evaluate reads them back there) and
    the experiment preset, known only to the process Hydra composed, becomes a tag of every member."""
    bag_name = Path(cfg.run_dir).resolve().name
    return replace(cfg.logger, group=cfg.logger.group or bag_name,
                   name=f"{cfg.logger.name or bag_name}/{member_name(index)}",
                   tags=list(identity.tags(identity.hydra_choice("experiment"), cfg.logger.tags)))


def training_part(cfg: schema.TrainConfig) -> schema.TrainConfig:
    """The plain training config inside a bag's or a curve's: what each of their runs records."""
    return schema.TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(schema.TrainConfig)})


def describe(cfg: schema.BagRunConfig, members: list[schema.TrainConfig]) -> dict:
    return {"format": "taxotrain-bag/1", "strategy": cfg.bag.strategy, "seed": cfg.bag.seed,
            "data": cfg.data.shards,
            "members": [{"name": Path(m.run_dir).name, "run_dir": Path(m.run_dir).name, "model": m.model.name,
                         "seed": m.trainer.seed, "bootstrap_member": m.data.bootstrap_member}
                        for m in members]}


def calibrate_bag(cfg: schema.BagRunConfig) -> None:
    """The bag's calibration.json, fitted on the validation split (`trainer/inference/calibrate.py`)."""
    from trainer.inference.calibrate import calibrate
    from trainer.inference.config import CalibrateConfig, EvalData

    if cfg.data.val_split is None or cfg.data.shards is None:
        log.warning("bag: no validation split, no calibration.json (fit one with taxotrain-calibrate)")
        return
    env = distributed.detect()
    fit = CalibrateConfig(bag=cfg.run_dir, workers=cfg.loader.workers, batch_size=cfg.loader.batch_size,
                          dist_timeout_s=cfg.trainer.dist_timeout_s,
                          data=EvalData(shards=cfg.data.shards, split=cfg.data.val_split))
    calibrate(fit, env.rank, env.world_size, distributed.select_device(env.local_rank))


def train_bag(cfg: schema.BagRunConfig) -> int:
    members = [member_config(cfg, i) for i in range(cfg.bag.members)]
    chosen = members if cfg.bag.only is None else [members[cfg.bag.only]]
    if distributed.is_main() and not cfg.launcher.dry_run:
        # No lock on the bag folder: members are run_dirs of their own, each locked by its Trainer, and
        # `bag.only=i` launches of one bag run side by side by design. Each may write bag.json: through its
        # own temporary and a rename (never removing another's), and one bag's launches write equal bytes.
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(cfg.run_dir) / BAG_FILE, json.dumps(describe(cfg, members), indent=1) + "\n")
    if cfg.launcher.kind == schema.LauncherKind.slurm:
        from trainer.jobs import slurm

        for member in chosen:
            slurm.preflight(member)
        return slurm.submit_array([slurm.for_the_job(m) for m in chosen], slurm.log_folder(cfg))
    # one process group for all members: creating a second one on the same port can hang
    distributed.init(distributed.detect(), cfg.trainer.dist_timeout_s)
    try:
        for member in chosen:  # one after the other; each member uses every rank of this launch
            log.info("bag member %s: model %s, seed %d, bootstrap %s", Path(member.run_dir).name,
                     member.model.name, member.trainer.seed, member.data.bootstrap_member)
            code = run(member)
            if code != 0:
                return code  # a stop (75) or failure: the same command resumes the bag from here
        if cfg.bag.calibrate and cfg.bag.only is None:
            calibrate_bag(cfg)
        return 0
    finally:
        distributed.cleanup()
