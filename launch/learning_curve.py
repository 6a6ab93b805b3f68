"""`python -m launch.learning_curve 'curve.fractions=[0.1,0.25,0.5,1.0]' run_dir=DIR` (`taxotrain-curve`).

How much annotation buys how much accuracy: one resumable training run per fraction of the training
split, each evaluated on `curve.eval_split`; `learning_curve.csv`, `learning_curve.png` and
`curve.json` in `run_dir` (`trainer/jobs/curve.py`). With `launcher=slurm` the runs go out as one
job array; then the same command with `curve.report_only=true` writes the report.
Schema: `trainer/config.py: CurveRunConfig`. Exit codes as `launch.train`.
"""
# ruff: noqa: E402 - the preemption signals are recorded before the heavy imports below
from __future__ import annotations

from trainer.runtime import signals

signals.listen_early()

from trainer.config import CurveRunConfig
from trainer.jobs.curve import learning_curve
from trainer.runtime import cli

main = cli.tool("curve", CurveRunConfig, learning_curve, __doc__)

if __name__ == "__main__":
    main()
