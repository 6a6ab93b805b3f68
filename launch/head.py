"""`python -m launch.head features=DIR head=random_forest|linear_svm|logistic` (`taxotrain-head`).

A classical classifier on the features `taxotrain-features` exported from a bag (native measurements,
embeddings, or both with a PCA of the deep part: EcoTaxa 2.8's recipe), searched on validation, judged on
test with `taxotrain-evaluate`'s metrics, and set beside the bag in `compare.md`
(`trainer/heads/run.py`). `engine=spark` runs it on PySpark MLlib (`slurm/head.sbatch` on a cluster).
Schema: `trainer/heads/config.py: HeadRunConfig`. Exit codes: 0 done; 1 the data failed; 2 a bad command.
"""
from __future__ import annotations

from trainer.heads.config import HeadRunConfig
from trainer.heads.run import run
from trainer.runtime import cli

main = cli.tool("head", HeadRunConfig, run, __doc__)

if __name__ == "__main__":
    main()
