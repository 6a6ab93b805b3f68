"""`python -m launch.train data.shards=DIR run_dir=DIR` (`taxotrain-train`): one training run.

In-process, under torchrun, or one srun task per rank; with `launcher=slurm`, submits the same run
to SLURM through Submitit (`trainer/jobs/slurm.py`). Exit codes: 0 finished; 75 stopped by a
signal or `trainer.stop_at_step` with a checkpoint written (the same command continues); 1 the
data or the run failed; 2 a bad command. Schema: `trainer/config.py`; the run: `trainer/jobs/run.py`.
"""
# ruff: noqa: E402 - the preemption signals are recorded before the heavy imports below
from __future__ import annotations

from trainer.runtime import signals

signals.listen_early()  # before the heavy imports: a signal now must not kill the job unrecorded

from trainer.config import TrainConfig
from trainer.jobs.run import dispatch
from trainer.runtime import cli

main = cli.tool("train", TrainConfig, lambda cfg: dispatch(cfg, cli.multirun()), __doc__)

if __name__ == "__main__":
    main()
