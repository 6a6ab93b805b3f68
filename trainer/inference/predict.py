"""Predict new images with a bag: the ensemble's top-k classes per image, and whether to accept it unseen.

`input` is a folder of images (searched recursively; hidden files ignored as `shards.build` does) or
a shard directory (`_info.json`, `split=test`, or an unlabelled set such as `split=unlabelled`). One row
per readable image, in input order (sorted relative paths; shard samples by key): its `object_id` when
the shards carry one, `class_1, prob_1, ..., class_k, prob_k` with the bag's calibrated probabilities
(`scoring.py`), and `decision`: `auto` when the top-1 clears its class's threshold in the bag's
`calibration.json`, else `review` (always without one). Formats (`outputs.py`): tsv, csv, parquet and
`ecotaxa`, EcoTaxa's import TSV. An image that cannot be read is never dropped: it goes to the sibling
`*.unreadable.tsv` with the reason, and the summary reconciles `N inputs = P predicted + U unreadable`.
Default out: `BAG/predictions.<format>` (never inside the image folder). Runs in-process, under
torchrun or as srun tasks: rank r predicts every world-th image (shards: EvalStream's deal), and rank 0
gathers the rows and writes both files atomically.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from shards import images as shard_images
from shards.sources import walk  # the same hidden-file rules as shards.build's listing
from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.transforms import MAX_PIXELS, BadSample, decode_bytes, image_kind
from trainer.inference.config import PredictConfig
from trainer.inference.members import Member, augment_config, input_transform, load_bag
from trainer.inference.outputs import PredictionRow, text_table, write_predictions
from trainer.inference.scoring import ENSEMBLE, Scorer, load_calibration
from trainer.runtime import distributed, files, lock
from trainer.runtime.exits import ConfigError
from trainer.runtime.files import atomic_write

log = logging.getLogger(__name__)
# decode_bytes decodes these; BMP and TIFF go through PIL as shards.build stores them (re-encoded as PNG)
DECODED = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif")
CONVERTED = (".bmp", ".tif", ".tiff")
# a generous cap, refused from stat before any read: a few hundred MB is already a very large image file
MAX_FILE_BYTES = 1 << 30




class Result(NamedTuple):
    inputs: int
    rows: list[PredictionRow]
    unreadable: list[data.BadRecord]
    skipped: Counter          # folder input: files that are not images, by extension
    k: int                    # classes per row (top_k clipped to the number of classes)


# ---------------------------------------------------------------- folder input


def list_images(root: Path) -> tuple[list[str], Counter]:
    """Sorted relative paths of the image files under `root`, and the other files' extensions."""
    if not root.is_dir():
        raise ConfigError(f"input: {root} is neither a folder of images nor a shard directory (_info.json)")
    found, skipped = [], Counter()
    for f in walk(root):
        suffix = f.suffix.lower()
        if suffix in DECODED or suffix in CONVERTED:
            found.append(f.relative_to(root).as_posix())
        else:
            skipped[suffix or "(none)"] += 1
    if not found:
        raise ConfigError(f"input: no images in {root} (looked for {' '.join(DECODED + CONVERTED)}; "
                          f"found {dict(skipped) or 'no files'})")
    return sorted(found), skipped


def read_image(path: Path) -> Tensor:
    """uint8 [3, H, W] RGB from an image file; `BadSample` says why it cannot be used."""
    raw = read_regular(path)
    if not raw:
        raise BadSample("empty file (0 bytes)")
    if image_kind(raw) is None:  # BMP, TIFF...: what shards.build would store; its own pixel limit
        raw = _via_pil(raw, path.name)
    return decode_bytes(raw, "image")


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES; `BadSample` for anything else.

    Judged by `stat` (following symlinks) before opening: a FIFO named like an image would block the
    open forever, and /dev/zero behind `x.png` would be read until memory runs out."""
    try:
        return files.read_regular(path, MAX_FILE_BYTES)
    except files.SpecialFile as err:
        raise BadSample(f"not a regular file ({err.kind})") from None
    except files.TooLarge as err:
        raise BadSample(err.reason) from None
    except OSError as err:
        raise BadSample(f"unreadable file: {err.strerror or err}") from err


def _via_pil(raw: bytes, name: str) -> bytes:
    """What shards.build would store: BMP/TIFF re-encoded as PNG; its reason when PIL fails too."""
    try:
        return shard_images.prepare(raw, name, None, 95, MAX_PIXELS).data
    except shard_images.BadImage as err:
        raise BadSample(str(err)) from None


class FolderStream(IterableDataset):
    """This rank's images as evaluation `Batch`es (key and meta["path"]: the relative path)."""

    def __init__(self, root: Path, paths: list[str], transform: Callable[[Tensor], Tensor],
                 batch_size: int) -> None:
        super().__init__()
        self.root, self.paths, self.transform, self.batch_size = root, paths, transform, batch_size

    def __iter__(self) -> Iterator[data.Batch]:
        info = get_worker_info()
        mine = self.paths[info.id::info.num_workers] if info else self.paths
        images: list[Tensor] = []
        keys: list[str] = []
        bad: list[data.BadRecord] = []
        for rel in mine:
            try:
                images.append(self.transform(read_image(self.root / rel)))
                keys.append(rel)
            except BadSample as err:
                bad.append(data.BadRecord("", rel, str(err)))
            if len(images) == self.batch_size:
                yield _batch(images, keys, bad)
                images, keys, bad = [], [], []
        if images or bad:
            yield _batch(images, keys, bad)


def _batch(images: list[Tensor], keys: list[str], bad: list[data.BadRecord]) -> data.Batch:
    stacked = torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)
    return data.Batch(stacked, torch.full((len(keys),), -1, dtype=torch.int64), tuple(bad),
                      keys=tuple(keys), meta=tuple({"path": k} for k in keys))


def _shared_listing(root: Path, rank: int) -> tuple[list[str], Counter]:
    """Rank 0 lists the folder once; every rank gets the same listing, or the same error."""
    payload: list = [None]
    if distributed.is_main():
        try:
            payload[0] = list_images(root)
        except ConfigError as err:
            payload[0] = str(err)
    if distributed.initialized():
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise ConfigError(payload[0])
    return payload[0]


# ---------------------------------------------------------------- prediction


def batches(cfg: PredictConfig, members: list[Member], rank: int, world: int
            ) -> tuple[int, Counter, Iterable[data.Batch]]:
    """(inputs in total, skipped files, this rank's batches) for either kind of input."""
    transform = input_transform(augment_config(members[0]), cfg.tta)
    if cfg.is_shards:
        split = shardset.load(cfg.input, cfg.split)
        # max_bad_fraction=1: every bad sample is listed as unreadable instead of stopping the run
        stream = data.EvalStream(split, transform, cfg.batch_size, rank, world, cfg.workers, 1.0,
                                 labelled=False)
        return split.num_samples, Counter(), data.eval_batches(stream, cfg.workers)
    paths, skipped = _shared_listing(Path(cfg.input), rank)
    stream = FolderStream(Path(cfg.input), paths[rank::world], transform, cfg.batch_size)
    return len(paths), skipped, data.eval_batches(stream, cfg.workers)


@torch.no_grad()
def predict_rows(stream: Iterable[data.Batch], scorer: Scorer, top_k: int
                 ) -> tuple[list[PredictionRow], list[data.BadRecord]]:
    """Top-k rows of the calibrated ensemble; `auto` where its top-1 clears its class's threshold."""
    classes = scorer.members[0].classes
    k = min(top_k, len(classes))
    thresholds = scorer.thresholds(ENSEMBLE)
    rows: list[PredictionRow] = []
    bad: list[data.BadRecord] = []
    for batch in stream:
        bad += batch.bad
        if not batch.keys:
            continue
        top = scorer(batch.images).ensemble.topk(k, dim=1)
        conf, pred = top.values[:, 0].numpy(), top.indices[:, 0].numpy()
        auto = thresholds.accept(conf, pred) if thresholds is not None else [False] * len(conf)
        for key, meta, p, i, ok in zip(batch.keys, batch.meta, top.values.tolist(), top.indices.tolist(),
                                       auto):
            rows.append(PredictionRow(key, str(meta.get("path", "")), str(meta.get("id", "")),
                                      tuple(classes[j] for j in i), tuple(p), "auto" if ok else "review"))
    return rows, bad


def predict(cfg: PredictConfig, rank: int, world: int, device: torch.device) -> Result | None:
    """Every rank predicts its share; rank 0 gets the whole result (in input order), the others None."""
    members = load_bag(cfg.bag, cfg.members, cfg.checkpoint, device)
    scorer = Scorer(members, cfg.tta, cfg.combine,
                    load_calibration(cfg.bag, cfg.calibration, members, cfg.tta, cfg.combine))
    inputs, skipped, stream = batches(cfg, members, rank, world)
    start = time.monotonic()
    rows, bad = predict_rows(stream, scorer, cfg.top_k)
    seconds = time.monotonic() - start
    parts = distributed.gather((rows, bad))
    if parts is None:
        return None
    log.info("%d members, tta=%s, combine=%s: rank 0 predicted %d images in %.1f s", len(members), cfg.tta,
             cfg.combine, len(rows), seconds)
    rows = sorted((r for part_rows, _ in parts for r in part_rows), key=lambda r: r.key)
    bad = sorted((b for _, part_bad in parts for b in part_bad), key=lambda b: b.key)
    if len(rows) + len(bad) != inputs:  # a lost or doubled image must never pass unnoticed
        raise data.DataError(f"{inputs} inputs but {len(rows)} predicted + {len(bad)} unreadable")
    return Result(inputs, rows, bad, skipped, min(cfg.top_k, len(members[0].classes)))


# ---------------------------------------------------------------- output


def unreadable_path(out: Path) -> Path:
    """The sibling listing unreadable inputs: CSV beside a CSV, TSV beside anything else."""
    suffix = ".csv" if out.suffix.lower() == ".csv" else ".tsv"
    return out.with_name(f"{out.stem}.unreadable{suffix}")


def write(result: Result, out: Path, shards: bool, fmt: str) -> Path:
    """The predictions and their `.unreadable` sibling (always written: no stale file survives)."""
    write_predictions(out, fmt, result.rows, result.k, shards)
    delimiter = "," if out.suffix.lower() == ".csv" else "\t"
    bad_header = ["key", "shard", "reason"] if shards else ["path", "reason"]
    bad_lines = ([b.key, b.shard, b.reason] if shards else [b.key, b.reason] for b in result.unreadable)
    sibling = unreadable_path(out)
    atomic_write(sibling, text_table(bad_header, bad_lines, delimiter))
    return sibling


def summary(result: Result, out: Path, sibling: Path) -> str:
    auto = sum(r.decision == "auto" for r in result.rows)
    text = (f"{result.inputs} inputs = {len(result.rows)} predicted + {len(result.unreadable)} unreadable\n"
            f"{auto} marked auto (above their class's threshold), {len(result.rows) - auto} review\n"
            f"predictions: {out}\nunreadable: {sibling}")
    if result.skipped:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(result.skipped.items()))
        text += f"\nnot images (by extension), not counted: {kinds}"
    return text


def run(cfg: PredictConfig) -> int:
    env = distributed.detect()
    device = distributed.init(env, cfg.dist_timeout_s)
    out = cfg.out_path()
    try:
        # the folder of the output file: its .unreadable sibling goes there too
        with lock.writing(out.parent, "predict", env):
            result = predict(cfg, env.rank, env.world_size, device)
            if result is not None:
                sibling = write(result, out, cfg.is_shards, cfg.out_format())
                print(summary(result, out, sibling))
        return 0
    finally:
        distributed.cleanup()
