"""`python -m launch.predict bag=DIR input=DIR [out=FILE] [head=DIR]` (`taxotrain-predict`).

The ensemble's top-k classes for every image of a folder or a shard split, one row each, and every
unreadable input listed with its reason, so that `inputs = predicted + unreadable`
(`trainer/inference/predict.py`). Default out: `BAG/predictions.tsv`; `.csv` writes CSV. With `head=DIR`
a classical head (`taxotrain-head`) classifies the bag's embeddings instead (`trainer/heads/predict.py`).
Schema: `trainer/inference/config.py: PredictConfig`. Exit codes: 0 done; 1 the data failed; 2 a bad command.
"""
from __future__ import annotations

from trainer.heads.predict import run  # the bag's ensemble, or head=DIR on its embeddings
from trainer.inference.config import PredictConfig
from trainer.runtime import cli

main = cli.tool("predict", PredictConfig, run, __doc__)

if __name__ == "__main__":
    main()
