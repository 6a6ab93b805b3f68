"""CPU decode paths, one thread, per image: why the `webdataset` backend decodes with torchvision.io.

On the loader benchmark's JPEGs (bytes already in memory, no I/O), side by side:

- `torchvision.io`: `decode_jpeg` to a uint8 tensor, then `transforms.v2` RandomResizedCrop +
  horizontal flip on the tensor (the `webdataset` backend's path, and the loader benchmark's ceiling);
- `PIL`: `Image.open` + `load`, then the same v2 transforms on the PIL image + `PILToTensor` (what
  torchvision's ImageFolder reference does in each DataLoader worker).

Each path is timed for decode alone and for decode + augment, over `--images` images, in `--repeats`
interleaved rounds after one warm-up round; the table gives the median microseconds per image, the
spread, and each path's speed relative to `torchvision.io` in the same round set.

    python benchmarks/decode_paths.py [--images 300] [--repeats 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from common import fmt, machine, table  # noqa: E402
from loader import CACHE, bench_set  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from trainer.data.streams import read_shard  # noqa: E402
from trainer.data.transforms import AugmentConfig, train_transform  # noqa: E402


@dataclass(frozen=True)
class Row:
    backend: str   # the decoder: torchvision.io or PIL
    step: str      # decode, or decode+augment
    images: int
    repeats: int
    us_per_image: float
    min: float
    max: float
    images_per_s: float
    speed_vs_torchvision: float | None


def pil_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image


def paths(aug: AugmentConfig) -> dict[tuple[str, str], Callable[[bytes, torch.Tensor], object]]:
    tensor_tf = train_transform(aug)  # the webdataset backend's transform
    crop = v2.RandomResizedCrop(aug.crop_size, scale=aug.scale, ratio=aug.ratio, antialias=True)
    pil_tf = v2.Compose([crop, v2.RandomHorizontalFlip(aug.hflip), v2.PILToTensor()])
    return {
        ("torchvision.io", "decode"): lambda _, t: decode_jpeg(t, mode=ImageReadMode.RGB),
        ("PIL", "decode"): lambda b, _: pil_decode(b),
        ("torchvision.io", "decode+augment"): lambda _, t: tensor_tf(decode_jpeg(t, mode=ImageReadMode.RGB)),
        ("PIL", "decode+augment"): lambda b, _: pil_tf(pil_decode(b)),
    }


def time_path(fn: Callable[[bytes, torch.Tensor], object], blobs: list[bytes], tensors: list[torch.Tensor],
              seed: int) -> float:
    torch.manual_seed(seed)  # the same crops for both decoders in a round
    start = time.perf_counter()
    for b, t in zip(blobs, tensors, strict=True):
        fn(b, t)
    return (time.perf_counter() - start) / len(blobs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--images", type=int, default=300, help="images timed per round (default 300)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--source-images", type=int, default=2000, help="loader.py's set (default 2000)")
    p.add_argument("--data", type=Path, default=CACHE)
    p.add_argument("--shard-maxcount", type=int, default=100)
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    args = p.parse_args(argv)
    if min(args.images, args.repeats, args.crop) < 1:
        p.error("--images, --repeats and --crop must be >= 1")

    root, train = bench_set(args.data, args.source_images, args.shard_maxcount, 0)
    samples = itertools.chain.from_iterable(read_shard(s) for s in train.shards)
    blobs = [s["jpg"] for s in itertools.islice(samples, args.images)]
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    torch.set_num_threads(1)  # as in a DataLoader worker
    timed = paths(AugmentConfig(crop_size=args.crop))
    got: dict[tuple[str, str], list[float]] = {k: [] for k in timed}
    for round_ in range(args.repeats + 1):
        for key, fn in timed.items():
            seconds = time_path(fn, blobs, tensors, round_)
            if round_:  # round 0 warms up
                got[key].append(seconds)

    rows = []
    for (backend, step), values in got.items():
        med = statistics.median(values)
        ref = statistics.median(got[("torchvision.io", step)])
        rows.append(Row(backend, step, len(blobs), args.repeats, med * 1e6, min(values) * 1e6,
                        max(values) * 1e6, 1 / med, ref / med))
    print(f"machine: {machine()}")
    print(f"{len(blobs)} JPEGs of {root} (bytes in memory), 1 thread, {args.repeats} rounds after a warm-up; "
          f"augment = RandomResizedCrop({args.crop}) + hflip\n")
    columns = ("decoder", "step", "us per image (median)>", "min-max>", "images/s>",
               "speed vs torchvision.io>")
    print(table(columns, [(r.backend, r.step, f"{r.us_per_image:.0f}", f"{r.min:.0f}-{r.max:.0f}",
                           f"{r.images_per_s:.0f}", fmt(r.speed_vs_torchvision, ".2f")) for r in rows]))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
