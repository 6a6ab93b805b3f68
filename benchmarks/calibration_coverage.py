"""Coverage at a target precision, for each member and the ensemble, before and after temperature scaling.

For each `--targets` precision p, in this process and on the same checkpoints: fit the bag's calibration
on the validation split with `target_precision=p` (`launch.calibrate`), then evaluate on the test split
(`launch.evaluate`). One table comes out, per model:
- the coverage at precision p of one threshold swept over the test split (an upper bound), raw and
  calibrated (temperature scaling is monotone per member, so it moves only the ensemble's);
- the coverage reached on test by the per-class thresholds fitted on validation, and the precision they
  keep there: what `launch.predict` marks `auto`;
- NLL and ECE on test, before and after scaling.
The bag's `calibration.json` is left as the last target fitted it. On the demo bag (`make demo`):

    python benchmarks/calibration_coverage.py --bag demo-run/bag --shards demo-run/shards \
        --targets 0.99 0.95 --json /tmp/calibration_coverage.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.inference.calibrate import calibrate  # noqa: E402
from trainer.inference.config import CalibrateConfig, EvalData, EvaluateConfig  # noqa: E402
from trainer.inference.evaluate import evaluate  # noqa: E402
from trainer.runtime import distributed  # noqa: E402


def one_target(bag: str, shards: str, target: float, workers: int) -> dict:
    """calibration.json fitted for `target`, then the test report that applies it."""
    env = distributed.detect()
    device = distributed.init(env, 300.0)
    try:
        calibrate(CalibrateConfig(bag=bag, data=EvalData(shards, "val"), target_precision=target,
                                  workers=workers), env.rank, env.world_size, device)
        cfg = EvaluateConfig(bag=bag, data=EvalData(shards, "test"), workers=workers, plots=False,
                             precisions=[target], out=tempfile.mkdtemp())
        return evaluate(cfg, env.rank, env.world_size, device)
    finally:
        distributed.cleanup()


def rows(report: dict, target: float) -> list[dict]:
    section, cal = report["acceptance"], report["calibration"]["models"]
    out = []
    for model in cal:
        auto = section["thresholds"][model]
        out.append({"target": target, "model": model,
                    "curve_before": section["coverage_at"]["before"][model][str(target)],
                    "curve_after": section["coverage_at"]["after"][model][str(target)],
                    "auto_coverage": auto["coverage"], "auto_precision": auto["precision"],
                    **cal[model]})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| p | model | coverage@p raw | coverage@p scaled | auto coverage | auto precision | "
             "NLL raw | NLL scaled | ECE raw | ECE scaled |", "|---|---|" + "---:|" * 8]
    for r in table:
        lines.append(f"| {r['target']} | {r['model']} | {r['curve_before']:.3f} | {r['curve_after']:.3f} | "
                     f"{r['auto_coverage']:.3f} | {r['auto_precision']:.4f} | {r['nll_before']:.4f} | "
                     f"{r['nll_after']:.4f} | {r['ece_before']:.4f} | {r['ece_after']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bag", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.99, 0.95])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    table = [r for t in args.targets for r in rows(one_target(args.bag, args.shards, t, args.workers), t)]
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
