"""`python -m launch.bag bag.members=K run_dir=DIR [training overrides]` (`taxotrain-bag`).

Trains a bag of K members into `run_dir/member-XX` (`trainer/jobs/bag.py`), locally one after the
other or as one SLURM job array (`launcher=slurm`); `run_dir/bag.json` lists them. Every training
setting applies to each member. Exit codes as `launch.train`. Schema: `trainer/config.py: BagRunConfig`.
"""
# ruff: noqa: E402 - the preemption signals are recorded before the heavy imports below
from __future__ import annotations

from trainer.runtime import signals

signals.listen_early()

from trainer.config import BagRunConfig
from trainer.jobs.bag import train_bag
from trainer.runtime import cli

main = cli.tool("bag", BagRunConfig, train_bag, __doc__)

if __name__ == "__main__":
    main()
