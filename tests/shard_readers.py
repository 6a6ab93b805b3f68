"""Read every sample of a shard set back through three independent readers: tar, webdataset, DALI."""
from __future__ import annotations

import json
import math
import subprocess
import tarfile
from pathlib import Path

Sample = tuple[str, bytes, int]  # (key, image bytes, class index)


def manifest(root: Path) -> dict:
    return json.loads((root / "_info.json").read_text())


def _shards(root: Path, split: str) -> list[dict]:
    return manifest(root)["splits"][split]["shards"]


def read_with_python_tarfile(root: Path, split: str) -> list[Sample]:
    out = []
    for s in _shards(root, split):
        with tarfile.open(root / s["filename"]) as tar:
            group: dict[str, dict[str, bytes]] = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                group.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, parts in group.items():
            img = next(v for e, v in parts.items() if e in ("jpg", "png", "webp"))
            out.append((key, img, int(parts["cls"])))
    return out


def read_with_gnu_tar(root: Path, split: str, workdir: Path) -> list[Sample]:
    """GNU tar extracts every shard; samples are re-grouped from the extracted files."""
    out = []
    for s in _shards(root, split):
        dest = workdir / s["filename"]
        dest.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(root / s["filename"]), "-C", str(dest)], check=True)
        for cls_file in sorted(dest.glob("*.cls")):
            key = cls_file.name.split(".", 1)[0]
            img = next(p for p in dest.glob(f"{key}.*") if p.suffix in (".jpg", ".png", ".webp"))
            out.append((key, img.read_bytes(), int(cls_file.read_text())))
    return out


def read_with_webdataset(root: Path, split: str) -> list[Sample]:
    import webdataset as wds

    urls = [str(root / s["filename"]) for s in _shards(root, split)]
    # no decoder: raw bytes only (the default decoders would unpickle .pyd members)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    out = []
    for sample in ds:
        img = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
        out.append((sample["__key__"], img, int(sample["cls"])))
    return out


def read_with_dali(root: Path, split: str) -> list[Sample]:
    from nvidia.dali import fn, pipeline_def

    shards = _shards(root, split)
    paths = [str(root / s["filename"]) for s in shards]
    index = [str(root / s["index"]) for s in shards]
    batch = 32

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        img, cls, meta = fn.readers.webdataset(
            paths=paths, index_paths=index, ext=["jpg;png;webp", "cls", "json"],
            missing_component_behavior="error", name="reader")
        return img, cls, meta

    p = pipe()
    p.build()
    total = p.epoch_size("reader")
    out = []
    for _ in range(math.ceil(total / batch)):
        img, cls, meta = p.run()
        for i in range(len(img)):
            path = json.loads(meta.at(i).tobytes())["path"]
            out.append((path, img.at(i).tobytes(), int(cls.at(i).tobytes())))
    # the reader wraps around to fill the last batch
    return out[:total]
