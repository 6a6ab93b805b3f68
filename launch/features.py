"""`python -m launch.features bag=DIR data.shards=DIR [mode=concat] [pca=50]` (`taxotrain-features`).

Each sample's penultimate embedding from every member, next to its native features, label and the
ensemble's probabilities, per split, as npz or parquet, for classical classifiers (EcoTaxa's random
forest): `trainer/inference/features.py`. Schema: `trainer/inference/config.py: FeaturesConfig`.
Exit codes: 0 done; 1 the data failed; 2 a bad command.
"""
from __future__ import annotations

from trainer.inference.config import FeaturesConfig
from trainer.inference.features import run
from trainer.runtime import cli

main = cli.tool("features", FeaturesConfig, run, __doc__)

if __name__ == "__main__":
    main()
