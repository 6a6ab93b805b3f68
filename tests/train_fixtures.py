"""Tiny shard sets with deliberately uneven shard sizes, written directly (no shards.build run).

Images are 16x16 PNGs whose mean colour encodes the class, so a model can learn them a little.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import encode_png

CLASSES = ("ant", "bee", "cat")


def png(label: int, seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 96, (3, size, size), dtype=np.uint8)
    image[label] += 120  # one channel brighter per class
    return encode_png(torch.from_numpy(image)).numpy().tobytes()


def jpeg(label: int, seed: int, size: int = 16, cmyk: bool = False) -> bytes:
    """The `png` image as a JPEG (quality 95 keeps the brightest channel); `cmyk`: a CMYK JPEG."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 96, (size, size, 3), dtype=np.uint8)
    image[..., label] += 120
    im = Image.fromarray(image)
    out = io.BytesIO()
    (im.convert("CMYK") if cmyk else im).save(out, "JPEG", quality=95)
    return out.getvalue()


def image_member(fmt: str, label: int, serial: int, size: int) -> tuple[str, bytes]:
    """`fmt` png | jpg | mixed: mostly JPEG, every 4th sample PNG and every 7th a CMYK JPEG."""
    if fmt == "png" or (fmt == "mixed" and serial % 4 == 0):
        return "png", png(label, serial, size)
    return "jpg", jpeg(label, serial, size, cmyk=fmt == "mixed" and serial % 7 == 0)


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], index: bool = True) -> None:
    """A ustar shard and, with `index`, its DALI v1.2 index as shards.build writes it (offsets read back
    from the tar with `tarfile`, independently of the writer's own arithmetic)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 946684800
                tar.addfile(info, io.BytesIO(data))
    if not index:
        return
    lines: dict[str, list[str]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            lines.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    text = "".join(" ".join(members) + "\n" for members in lines.values())
    path.with_suffix(".idx").write_text(f"v1.2 {len(lines)}\n{text}")


Corrupt = dict[tuple[str, int], list[int]]


def sample_features(serial: int, names: tuple[str, ...]) -> dict[str, float | None]:
    """Per-sample native features; every fifth value is null (unmeasured), as EcoTaxa leaves them."""
    return {n: None if (serial + i) % 5 == 0 else serial * 0.25 + i for i, n in enumerate(names)}


def write_shardset(root: Path, sizes: dict[str, list[int]], corrupt: Corrupt | None = None,
                   image_size: int = 16, features: tuple[str, ...] | None = None,
                   image_format: str = "png", index: bool = True) -> Path:
    """Shards `{split}-{i:06d}.tar` with the given sample counts and an `_info.json` like shards.build's.

    `corrupt[(split, shard)]` lists sample positions whose image bytes are cut in half. `image_format`:
    see `image_member`. `index=False` leaves out the `.idx` files. `features` (names)
    adds a `.json` member per sample as shards.build writes it (class, path, image, features) and lists
    the names in `_info.json`; without it samples have no `.json`.
    """
    root.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    splits, serial = {}, 0
    for split, counts in sizes.items():
        entries, class_counts = [], [0] * len(CLASSES)
        for i, count in enumerate(counts):
            samples = []
            for j in range(count):
                label = serial % len(CLASSES)
                ext, data = image_member(image_format, label, serial, image_size)
                if j in corrupt.get((split, i), []):
                    data = data[: len(data) // 2]
                key = f"{split}{i}_{j:04d}-{serial:06d}"
                members = {ext: data, "cls": str(label).encode()}
                if features is not None:
                    meta = {"class": CLASSES[label], "path": f"{CLASSES[label]}/{key}.{ext}", "image": ext,
                            "features": sample_features(serial, features)}
                    members["json"] = json.dumps(meta, sort_keys=True).encode()
                samples.append((key, members))
                class_counts[label] += 1
                serial += 1
            name = f"{split}-{i:06d}.tar"
            write_shard(root / name, samples, index)
            blob = (root / name).read_bytes()
            entries.append({"filename": name, "num_samples": count, "bytes": len(blob),
                            "sha256": hashlib.sha256(blob).hexdigest()})
        splits[split] = {"name": split, "num_samples": sum(counts),
                         "filenames": [e["filename"] for e in entries],
                         "shard_lengths": counts, "shards": entries, "class_counts": class_counts}
    info = {"format": "taxotrain-shards/1", "classes": list(CLASSES), "num_classes": len(CLASSES),
            "splits": splits}
    if features is not None:
        info["features"] = list(features)
    (root / "_info.json").write_text(json.dumps(info, indent=1))
    return root


def final_state(run_dir: Path) -> dict:
    """The newest step checkpoint of a run, loaded as the trainer does (weights_only)."""
    files = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    return torch.load(files[-1], map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bitwise equality of parameters, buffers and SGD momentum."""
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, sa in a["optimizer"]["state"].items():
        assert torch.equal(sa["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"]), pid


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def shard_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples in tar order, each member grouped by its name before the first dot."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(samples.items())


def record_index_digests(root: Path) -> Path:
    """Adds each shard's `.idx` sha256 to `_info.json` (`index_sha256`), as shards.build records it."""
    info = json.loads((root / "_info.json").read_text())
    for split in info["splits"].values():
        for entry in split["shards"]:
            idx = (root / entry["filename"]).with_suffix(".idx")
            entry["index_sha256"] = hashlib.sha256(idx.read_bytes()).hexdigest()
    (root / "_info.json").write_text(json.dumps(info, indent=1))
    return root


def rewrite_shard(root: Path, name: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Shard `name` and its index rewritten with `samples`, and its `_info.json` entry made to match
    (count, bytes, sha256, and `index_sha256` where recorded): a producer whose manifest agrees with
    its careless data, so only checks of the content itself can catch it."""
    write_shard(root / name, samples)
    info = json.loads((root / "_info.json").read_text())
    for split in info["splits"].values():
        for i, entry in enumerate(split["shards"]):
            if entry["filename"] != name:
                continue
            blob = (root / name).read_bytes()
            entry.update(num_samples=len(samples), bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
            if "index_sha256" in entry:
                idx = (root / name).with_suffix(".idx").read_bytes()
                entry["index_sha256"] = hashlib.sha256(idx).hexdigest()
            split["shard_lengths"][i] = len(samples)
            split["num_samples"] = sum(split["shard_lengths"])
    (root / "_info.json").write_text(json.dumps(info, indent=1))
