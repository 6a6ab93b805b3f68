"""Rare classes on a long-tailed version of the demo digits: no weighting, balanced weights, logit adjustment.

From the 5,000 bundled MNIST digits (`python -m shards.build source=demo`, the split `make demo` uses),
class k keeps round(400 * (8/400)^(k/9)) of its 400 training images (400, 259, ..., 12, 8; the first
ones by file name), with the same validation and test splits (50 per class). The set is rebuilt with
`source=csv` and `source.split_column`, so every image keeps the split it has in the demo set.
Then, per setting, a bag of `--members` trained with the demo recipe (`experiment=demo`, whatever
conf/experiment/demo.yaml holds when this runs; `--epochs` overrides its trainer.epochs) and evaluated on
the test split (`launch.evaluate`, default frequency bins: rare < 20, medium 20..99, common >= 100
training images). One markdown table: balanced accuracy, rare-bin mean recall and top-1 for every
member and the ensemble.

    python benchmarks/long_tail.py --work /tmp/long-tail --json /tmp/long-tail/rows.json
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, table, tool  # noqa: E402

DIGITS = Path("~/.cache/taxotrain/demo-mnist").expanduser()  # where source=demo writes the PNGs
SETTINGS = {"none": [], "balanced": ["optim.class_weight=balanced"],
            "logit-adjust": ["optim.logit_adjust_tau={tau}"]}


def kept(k: int, head: int = 400, tail: int = 8, classes: int = 10) -> int:
    """Training images class k keeps: geometric from `head` (class 0) down to `tail` (the last class)."""
    return round(head * (tail / head) ** (k / (classes - 1)))


def demo_splits(shards: Path) -> dict[str, str]:
    """Image path (relative to the digits folder) -> split, read from the demo set's sample metadata."""
    splits = {}
    for tar in sorted(shards.glob("*.tar")):
        split = tar.name.split("-")[0]
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    splits[json.loads(archive.extractfile(member).read())["path"]] = split
    return splits


def long_tail_table(splits: dict[str, str], out: Path) -> dict[str, int]:
    """The CSV of the long-tailed set; returns the training images kept per class."""
    by_class: dict[str, list[str]] = {}
    for path in sorted(p for p, s in splits.items() if s == "train"):
        by_class.setdefault(path.split("/")[0], []).append(path)
    rows = [(p, p.split("/")[0], s) for p, s in sorted(splits.items()) if s != "train"]
    counts = {}
    for label in sorted(by_class, key=int):
        keep = by_class[label][: kept(int(label))]
        counts[label] = len(keep)
        rows += [(p, label, "train") for p in keep]
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return counts


def train_and_evaluate(name: str, overrides: list[str], shards: Path, work: Path, members: int) -> dict:
    bag = work / name
    tool("launch.bag", "experiment=demo", f"bag.members={members}", f"data.shards={shards}", f"run_dir={bag}",
         *overrides)
    tool("launch.evaluate", f"bag={bag}", f"data.shards={shards}", "data.split=test", "workers=1")
    return json.loads((bag / "report.json").read_text())


def rows(setting: str, report: dict) -> list[list[str]]:
    """balanced accuracy, rare-bin recall and top-1 of every member and the ensemble."""
    freq = report["frequency"]
    rare = [b["name"] for b in freq["bins"]].index("rare")
    out = []
    for model, values in [*report["members"].items(), ("ensemble", report["ensemble"])]:
        shown = "**ensemble**" if model == "ensemble" else model
        out.append([setting, shown, f"{values['balanced_acc']:.4f}",
                    f"{freq['models'][model][rare]['mean_recall']:.4f}", f"{values['top1']:.4f}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the shard sets and the bags")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--tau", type=float, default=1.0, help="logit adjustment's tau (1: Menon et al.)")
    parser.add_argument("--epochs", type=int, help="trainer.epochs for every member (default: the recipe's)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tool("shards.build", "source=demo", f"out={work / 'demo'}", "shard.maxcount=250")
    counts = long_tail_table(demo_splits(work / "demo"), work / "long_tail.csv")
    shards = work / "shards"
    tool("shards.build", "source=csv", f"source.path={work / 'long_tail.csv'}", f"source.root={DIGITS}",
         "source.split_column=split", f"out={shards}", "shard.maxcount=250")
    extra = [f"trainer.epochs={args.epochs}"] if args.epochs else []
    reports, lines = {}, []
    for setting in args.settings:
        overrides = [o.format(tau=args.tau) for o in SETTINGS[setting]] + extra
        reports[setting] = train_and_evaluate(setting, overrides, shards, work, args.members)
        lines += rows(setting, reports[setting])
    minutes = (time.perf_counter() - start) / 60
    recipe = (REPO / "conf" / "experiment" / "demo.yaml").read_text()  # it changes with the demo
    print(f"\nmachine: {machine()}\nrecipe (conf/experiment/demo.yaml) at the end of the run:\n{recipe}")
    print(f"training images per class: {counts}; {minutes:.1f} min in all\n")
    print(table(["setting", "model", "balanced acc>", "rare-bin recall>", "top-1>"], lines))
    if args.json:
        frequency = {s: r["frequency"] for s, r in reports.items()}
        args.json.write_text(json.dumps({"counts": counts, "minutes": minutes, "rows": lines,
                                         "recipe": recipe, "extra": extra, "frequency": frequency}, indent=1))


if __name__ == "__main__":
    main()
