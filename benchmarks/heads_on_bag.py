"""Evidence for issue 17: on one bag's exported features, the CNN members and ensemble against every
classical head the issue names, on the same test split, in one run.

    python benchmarks/heads_on_bag.py FEATURES_DIR [--out DIR] [taxotrain-head overrides...]

FEATURES_DIR is what `taxotrain-features` wrote (`make demo` leaves demo-run/bag/features); the bag's
`report.json` on the test split must exist (`taxotrain-evaluate ... data.split=test`). Runs, with
`taxotrain-head` as a user would: random forest on native only, on deep only (PCA 50) and on native +
PCA(deep) (EcoTaxa 2.8); linear SVM one-vs-rest and one-vs-one; logistic regression. Prints the machine
and `compare.md` (top-1, balanced accuracy, top-5, NLL, ECE, auto coverage, frequency bins), and the
fit time and throughput of each head.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import fmt, machine, table, tool

HEADS = {
    "random_forest-native": ["head=random_forest", "inputs=native"],
    "random_forest-deep": ["head=random_forest", "inputs=deep"],
    "random_forest-both": ["head=random_forest", "inputs=both"],
    "linear_svm-ovr-both": ["head=linear_svm", "inputs=both"],
    "linear_svm-ovo-both": ["head=linear_svm", "head.scheme=ovo", "inputs=both"],
    "logistic-both": ["head=logistic", "inputs=both"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="heads folder (default: a fresh one beside)")
    parser.add_argument("overrides", nargs="*", help="added to every head, e.g. head.trees=100")
    args = parser.parse_intermixed_args()  # overrides may follow --out
    out = args.out or args.features / "heads-benchmark"
    shutil.rmtree(out, ignore_errors=True)  # compare.md gathers every head in the folder: start clean
    print(machine())
    for name, overrides in HEADS.items():
        tool("launch.head", f"features={args.features}", *overrides, *args.overrides, f"out={out / name}")
    print((out / "compare.md").read_text())
    rows = []
    for name in HEADS:
        report = json.loads((out / name / "report.json").read_text())
        timing = report["timing"]
        rows.append([name, report["params"], fmt(timing["fit_s"], ".1f"),
                     fmt(timing["fit_rows_per_s"], ".0f"), fmt(timing["predict_rows_per_s"], ".0f")])
    print(table(["head", "chosen on val", "final fit s>", "fit rows/s>", "predict rows/s>"], rows))


if __name__ == "__main__":
    main()
