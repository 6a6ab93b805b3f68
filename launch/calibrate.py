"""`python -m launch.calibrate bag=DIR data.shards=DIR [data.split=val]` (`taxotrain-calibrate`).

Fits the bag's calibration on a labelled split (validation by default): one temperature per member
and one for the ensemble (by NLL), and per-class confidence thresholds so that objects accepted
automatically reach `target_precision`. Writes `<bag>/calibration.json`, which evaluate, predict,
features and export then apply (`calibration=none` turns it off). `taxotrain-bag` runs it after
training on its own. Schema: `trainer/inference/config.py: CalibrateConfig`.
Exit codes: 0 done; 1 the data failed; 2 a bad command.
"""
from __future__ import annotations

from trainer.inference.calibrate import run
from trainer.inference.config import CalibrateConfig
from trainer.runtime import cli

main = cli.tool("calibrate", CalibrateConfig, run, __doc__)

if __name__ == "__main__":
    main()
