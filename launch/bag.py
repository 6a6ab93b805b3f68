"""`python -m launch.bag bag.members=K run_dir=DIR [training overrides]`: train a bag of K members.

Each member is an ordinary training run in `run_dir/member-XX` (resumable on its own) with seed
`bag.seed * 1000 + i`; with `bag.strategy=bootstrap` it also trains on its own Poisson(1)
bootstrap resample of the training split (`trainer/data.py: bootstrap_count`), and `bag.models`
can give members different architectures. `run_dir/bag.json` lists the members. Locally the
members train one after the other (each with all ranks, under torchrun or srun); with
`launcher=slurm` they go out as one job array; `bag.only=i` trains member i alone (slurm/bag.sbatch).
"""
# ruff: noqa: E402 - the preemption signals are recorded before the heavy imports below
from __future__ import annotations

from trainer import preempt

preempt.listen_early()

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.exits import guarded
from launch.train import run
from trainer import config as schema
from trainer import distributed
from trainer.provenance import write_text_atomic

log = logging.getLogger("launch.bag")
BAG_FILE = "bag.json"


def member_name(index: int) -> str:
    return f"member-{index:02d}"


def member_config(cfg: schema.TrainConfig, index: int) -> schema.TrainConfig:
    """Member `index` of the bag: its own run directory, seed, resample and (optionally) architecture."""
    bag = cfg.bag
    model = replace(cfg.model, name=bag.models[index % len(bag.models)]) if bag.models else cfg.model
    data = replace(cfg.data, bootstrap_member=index if bag.strategy == "bootstrap" else None,
                   bootstrap_seed=bag.seed)
    trainer = replace(cfg.trainer, seed=bag.seed * 1000 + index)
    return replace(cfg, model=model, data=data, trainer=trainer,
                   run_dir=str(Path(cfg.run_dir) / member_name(index)))


def describe(cfg: schema.TrainConfig, members: list[schema.TrainConfig]) -> dict:
    return {"format": "taxotrain-bag/1", "strategy": cfg.bag.strategy, "seed": cfg.bag.seed,
            "data": cfg.data.shards,
            "members": [{"name": Path(m.run_dir).name, "run_dir": Path(m.run_dir).name, "model": m.model.name,
                         "seed": m.trainer.seed, "bootstrap_member": m.data.bootstrap_member}
                        for m in members]}


def train_bag(cfg: schema.TrainConfig) -> int:
    members = [member_config(cfg, i) for i in range(cfg.bag.members)]
    chosen = members if cfg.bag.only is None else [members[cfg.bag.only]]
    if distributed.detect().rank == 0 and not cfg.launcher.dry_run:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(cfg.run_dir) / BAG_FILE, json.dumps(describe(cfg, members), indent=1) + "\n")
    if cfg.launcher.kind == "slurm":
        from launch import slurm

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
        return 0
    finally:
        distributed.cleanup()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(raw: DictConfig) -> None:
    sys.exit(guarded(lambda: train_bag(OmegaConf.to_object(raw)), log))


if __name__ == "__main__":
    main()
