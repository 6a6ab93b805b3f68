"""`python -m launch.evaluate bag=DIR data.shards=DIR [data.split=test]` (`taxotrain-evaluate`).

Each member of a bag and their ensemble on one labelled split, with optional test-time augmentation:
`report.json`, `report.md`, `per_class.csv`, `confusion.png`, `reliability.png` in the bag (or
`out=DIR`), and W&B with `logger.mode=offline|online` (`trainer/inference/evaluate.py`). Runs
in-process, under torchrun or as srun tasks. Schema: `trainer/inference/config.py: EvaluateConfig`.
Exit codes: 0 done; 1 the data failed; 2 a bad command.
"""
from __future__ import annotations

from trainer.inference.config import EvaluateConfig
from trainer.inference.evaluate import run
from trainer.runtime import cli

main = cli.tool("evaluate", EvaluateConfig, run, __doc__)

if __name__ == "__main__":
    main()
