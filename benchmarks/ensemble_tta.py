"""Members against their ensemble, with and without test-time augmentation, on one trained bag.

Evaluates the bag once per `--tta` mode with `launch.evaluate` (in this process, same split, same
checkpoints) and prints one table: for each mode, each member and the ensemble, top-1, MRR, NLL and
ECE. This is the evidence docs/BENCHMARKS.md gives for bagging; the numbers are measured, one run each
(evaluation is deterministic: a rerun gives the same digits). On the demo bag (`make demo`):

    python benchmarks/ensemble_tta.py --bag demo-run/bag --shards demo-run/shards --split test \
        --tta none hflip fivecrop tencrop --json /tmp/ensemble_tta.json
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

from trainer.inference.config import EvalData, EvaluateConfig  # noqa: E402
from trainer.inference.evaluate import evaluate  # noqa: E402
from trainer.inference.members import TTA  # noqa: E402
from trainer.runtime import distributed  # noqa: E402

KEYS = ("top1", "mrr", "nll", "ece")


def rows_for(bag: str, shards: str, split: str, tta: str, combine: str, workers: int) -> list[dict]:
    cfg = EvaluateConfig(bag=bag, data=EvalData(shards, split), tta=tta, combine=combine, workers=workers,
                         plots=False, out=tempfile.mkdtemp())
    env = distributed.detect()
    device = distributed.init(env, cfg.dist_timeout_s)
    try:
        report = evaluate(cfg, env.rank, env.world_size, device)
    finally:
        distributed.cleanup()
    models = [*report["members"].items(), ("ensemble", report["ensemble"])]
    return [{"tta": tta, "model": name, "combine": combine, "n": values["n"], **{k: values[k] for k in KEYS}}
            for name, values in models]


def table(rows: list[dict]) -> str:
    lines = ["| TTA | model | top-1 | MRR | NLL | ECE |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tta']} | {r['model']} | {r['top1']:.4f} | {r['mrr']:.4f} | {r['nll']:.4f} "
                     f"| {r['ece']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bag", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--tta", nargs="+", default=["none", "hflip"], choices=TTA)
    parser.add_argument("--combine", default="mean", choices=["mean", "geometric"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows as a JSON list")
    args = parser.parse_args()
    rows = [row for tta in args.tta for row in rows_for(args.bag, args.shards, args.split, tta, args.combine,
                                                         args.workers)]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, "
          f"python {platform.python_version()}; bag {args.bag}, split {args.split}, n={rows[0]['n']}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
