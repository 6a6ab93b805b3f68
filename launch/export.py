"""`python -m launch.export bag=DIR [members=[a,b]] [checkpoint=best|latest] [out=DIR] [format=onnx]
[ensemble=true]` (`taxotrain-export`).

Writes each member as `<name>.safetensors` + `<name>.json` and a `bag.json` into `out` (default
`<bag>/export`), with the bag's temperatures and acceptance thresholds when it has a
`calibration.json` (`calibration=none` leaves them out): loadable without pickle
(`trainer/inference/export.py: load_exported_bag`). `format=onnx` writes `<name>.onnx` instead: uint8
RGB images (resized and cropped as the JSON's `input` says) in, logits and calibrated probabilities
out, batch dynamic, for onnxruntime or any ONNX runtime; `ensemble=true` adds `ensemble.onnx`, the
whole bag in one graph (members, mean, ensemble temperature), described in bag.json's `ensemble`.
`logger.mode=offline|online` also logs the folder as a W&B artifact in the bag's group.
Schema: `trainer/inference/config.py: ExportConfig`. Exit codes: 0 done; 2 a bad command (a missing
bag, no checkpoint, a corrupt checkpoint, unknown members, ensemble=true without format=onnx, members
that prepare images differently in one ensemble graph).
"""
from __future__ import annotations

from trainer.inference.config import ExportConfig
from trainer.inference.export import run
from trainer.runtime import cli

main = cli.tool("export", ExportConfig, run, __doc__)

if __name__ == "__main__":
    main()
