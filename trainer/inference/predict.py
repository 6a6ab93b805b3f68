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
gathers the rows and writes both files atomically. That holds the whole run in rank 0: for large shard
sets, `parts=true` has each rank stream its rows into its own parquet part (memory: one batch), array
tasks split the shards (`task_index/task_count`, `stage=write|merge`), and only counts cross ranks
(`parts.py`).
"""
from __future__ import annotations

import contextlib
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
from trainer.inference import parts
from trainer.inference.calibration import Thresholds
from trainer.inference.config import PredictConfig, PredictStage
from trainer.inference.members import Member, augment_config, input_transform, load_bag
from trainer.inference.outputs import PredictionRow, default_name, text_table, write_predictions
from trainer.inference.scoring import ENSEMBLE, Scorer, calibration_path, load_calibration
from trainer.runtime import distributed, files, lock, logfile, progress
from trainer.runtime.exits import ConfigError, RunFailure
from trainer.runtime.files import atomic_write

log = logging.getLogger(__name__)
# decode_bytes decodes these; BMP and TIFF go through PIL as shards.build stores them (re-encoded as PNG)
DECODED = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif")
CONVERTED = (".bmp", ".tif", ".tiff")
# a generous cap, refused from stat before any read: a few hundred MB is already a very large image file
MAX_FILE_BYTES = 1 << 30




ScoringFactory = Callable[[PredictConfig, list[Member]], "Scoring"]


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
    for rel in walk(root):
        suffix = Path(rel).suffix.lower()
        if suffix in DECODED or suffix in CONVERTED:
            found.append(rel)
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


class Scoring(NamedTuple):
    """What turns a batch into rows: the bag's calibrated ensemble, or a classical head on its embeddings
    (`trainer/heads/predict.py`)."""

    classes: list[str]
    probabilities: Callable[[data.Batch], Tensor]  # [N, C] for the batch's images
    thresholds: Thresholds | None                  # None: every row is `review`


def bag_scoring(cfg: PredictConfig, members: list[Member]) -> Scoring:
    scorer = Scorer(members, cfg.tta, cfg.combine,
                    load_calibration(cfg.bag, cfg.calibration, members, cfg.tta, cfg.combine))
    return Scoring(members[0].classes, lambda batch: scorer(batch.images).ensemble,
                   scorer.thresholds(ENSEMBLE))


def predict_rows(stream: Iterable[data.Batch], scoring: Scoring, top_k: int
                 ) -> tuple[list[PredictionRow], list[data.BadRecord]]:
    """Every row of `stream`, in memory (the single-file output sorts them)."""
    rows: list[PredictionRow] = []
    bad: list[data.BadRecord] = []
    for batch_rows, batch_bad in scored(stream, scoring, top_k):
        rows += batch_rows
        bad += batch_bad
    return rows, bad


@torch.no_grad()
def scored(stream: Iterable[data.Batch], scoring: Scoring, top_k: int
           ) -> Iterator[tuple[list[PredictionRow], tuple[data.BadRecord, ...]]]:
    """Per batch: top-k rows of the calibrated scores (`auto` where the top-1 clears its class's
    threshold) and the batch's unreadable inputs."""
    classes, thresholds = scoring.classes, scoring.thresholds
    k = min(top_k, len(classes))
    for batch in stream:
        if not batch.keys:
            yield [], batch.bad
            continue
        top = scoring.probabilities(batch).topk(k, dim=1)
        conf, pred = top.values[:, 0].numpy(), top.indices[:, 0].numpy()
        auto = thresholds.accept(conf, pred) if thresholds is not None else [False] * len(conf)
        yield [PredictionRow(key, str(meta.get("path", "")), str(meta.get("id", "")),
                             tuple(classes[j] for j in i), tuple(p), "auto" if ok else "review")
               for key, meta, p, i, ok in zip(batch.keys, batch.meta, top.values.tolist(),
                                              top.indices.tolist(), auto)], batch.bad


def predict(cfg: PredictConfig, rank: int, world: int, device: torch.device,
            scoring: ScoringFactory = bag_scoring) -> Result | None:
    """Every rank predicts its share; rank 0 gets the whole result (in input order), the others None."""
    members = load_bag(cfg.bag, cfg.members, cfg.checkpoint, device)
    scorer = scoring(cfg, members)
    inputs, skipped, stream = batches(cfg, members, rank, world)
    start = time.monotonic()
    seen = progress.of_ranks("predict", inputs, cfg.progress_every_s, rank == 0, world)
    rows, bad = predict_rows(seen.track(stream, lambda b: len(b.labels) + len(b.bad)), scorer, cfg.top_k)
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
    return Result(inputs, rows, bad, skipped, min(cfg.top_k, len(scorer.classes)))


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


def run(cfg: PredictConfig, scoring: ScoringFactory = bag_scoring) -> int:
    if cfg.parts:
        return run_parts(cfg, scoring)
    env = distributed.detect()
    device = distributed.init(env, cfg.dist_timeout_s)
    out = cfg.out_path()
    try:
        # the folder of the output file: its .unreadable sibling goes there too
        with lock.writing(out.parent, "predict", env):
            logfile.attach(out.parent, "predict", distributed.is_main(env))  # beside the predictions
            result = predict(cfg, env.rank, env.world_size, device, scoring)
            if result is not None:
                sibling = write(result, out, cfg.is_shards, cfg.out_format())
                logfile.echo(summary(result, out, sibling))
        return 0
    finally:
        distributed.cleanup()


# ---------------------------------------------------------------- parts=true (trainer/inference/parts.py)


def run_parts(cfg: PredictConfig, scoring: ScoringFactory) -> int:
    """stage=write: this task's parts; stage=all: the same, then rank 0 merges; stage=merge: the merge."""
    folder = cfg.out_path()
    split = shardset.load(cfg.input, cfg.split)
    env = distributed.detect()
    if cfg.stage == PredictStage.merge:
        with lock.writing(folder, "predict", env):
            logfile.attach(folder, "predict", distributed.is_main(env))
            if distributed.is_main(env):
                merge_parts(cfg, split, folder)
        return 0
    device = distributed.init(env, cfg.dist_timeout_s)
    # the tasks of an array write disjoint parts of one folder at once, so stage=write takes no lock
    # (as shards.build stage=write); each task logs to its own file
    single = cfg.stage == PredictStage.all
    tool = "predict" if single else f"predict-task-{cfg.task_index:05d}"
    try:
        with lock.writing(folder, "predict", env) if single else contextlib.nullcontext():
            folder.mkdir(parents=True, exist_ok=True)
            logfile.attach(folder, tool, distributed.is_main(env))
            write_parts(cfg, split, folder, env.rank, env.world_size, device, scoring)
            if single and distributed.is_main(env):
                merge_parts(cfg, split, folder)
            distributed.barrier()  # a rank-0 failure while merging fails every rank, not only rank 0
        return 0
    finally:
        distributed.cleanup()


def write_parts(cfg: PredictConfig, split: shardset.ShardSet, folder: Path, rank: int, world: int,
                device: torch.device, scoring: ScoringFactory) -> None:
    """This rank's part of this task; then only counts cross ranks, with a failure flag, so that a rank
    that failed makes every rank of the task fail at once instead of leaving them waiting."""
    failure: Exception | None = None
    counts = [0, 0, 0]
    try:
        counts = write_part(cfg, split, folder, rank, world, device, scoring)
    except Exception as err:  # re-raised below, after the others learnt of it
        log.error("rank %d, %s: %s", rank, parts.stem(cfg.task_index, rank), err)  # even if the sum times out
        failure = err
    totals = distributed.all_sum(torch.tensor([*counts, failure is not None], dtype=torch.int64)).tolist()
    if failure is not None:
        raise failure
    if totals[3]:
        raise RunFailure(f"task {cfg.task_index}: {totals[3]} other rank(s) failed writing their parts "
                         f"(their error is in their own output); rerun the task")
    if rank == 0:
        logfile.echo(f"task {cfg.task_index}/{cfg.task_count}: {totals[0]} inputs = {totals[1]} predicted + "
                     f"{totals[2]} unreadable in {world} part(s) -> {folder}")


def write_part(cfg: PredictConfig, split: shardset.ShardSet, folder: Path, rank: int, world: int,
               device: torch.device, scoring: ScoringFactory) -> list[int]:
    """(inputs, predicted, unreadable) of this (task, rank)'s part, written now or found finished."""
    members = load_bag(cfg.bag, cfg.members, cfg.checkpoint, device)
    scorer = scoring(cfg, members)
    mine = parts.task_split(split, cfg.task_index, cfg.task_count)
    transform = input_transform(augment_config(members[0]), cfg.tta)
    # max_bad_fraction=1: every bad sample is listed as unreadable instead of stopping the run
    stream = data.EvalStream(mine, transform, cfg.batch_size, rank, world, cfg.workers, 1.0, labelled=False)
    pieces = parts.covered(stream, mine)
    inputs = sum(p["end"] - p["first"] for p in pieces)
    identity = {"part": parts.stem(cfg.task_index, rank), "split": split.split, "task_index": cfg.task_index,
                "task_count": cfg.task_count, "rank": rank, "world": world, "pieces": pieces,
                "settings": parts.settings_digest(settings(cfg, members, scorer))}
    done = parts.finished(folder, identity)
    if done is not None:
        log.info("%s: finished before with the same shards, digests and settings: skipped", identity["part"])
        return [done["inputs"], done["predicted"], done["unreadable"]]
    seen = progress.of_ranks(f"predict task {cfg.task_index}", mine.num_samples, cfg.progress_every_s,
                             rank == 0, world)
    batches = seen.track(data.eval_batches(stream, cfg.workers), lambda b: len(b.labels) + len(b.bad))
    with parts.PartWriter(folder, identity["part"], min(cfg.top_k, len(scorer.classes))) as part:
        for rows, bad in scored(batches, scorer, cfg.top_k):
            part.add(rows, bad)
    record = part.finish(identity, inputs)
    return [record["inputs"], record["predicted"], record["unreadable"]]


def settings(cfg: PredictConfig, members: list[Member], scorer: Scoring) -> dict:
    """What decides a part's rows: a finished part written under other settings is written again."""
    calibration = calibration_path(cfg.bag)
    used = cfg.calibration != "none" and calibration.is_file()
    head = Path(cfg.head) / "head.json" if cfg.head else None
    return {"bag": str(Path(cfg.bag).resolve()), "checkpoint": str(cfg.checkpoint), "tta": str(cfg.tta),
            "combine": str(cfg.combine), "top_k": cfg.top_k, "classes": list(scorer.classes),
            "members": [[m.name, m.step, m.model_name] for m in members],
            "calibration": files.sha256_file(calibration) if used else None,
            "head": [str(head.resolve()), files.sha256_file(head)] if head else None}


def merge_parts(cfg: PredictConfig, split: shardset.ShardSet, folder: Path) -> None:
    manifest = parts.merge(folder, split, str(Path(cfg.input).resolve()))
    lines = [f"{manifest['inputs']} inputs = {manifest['predicted']} predicted + {manifest['unreadable']} "
             f"unreadable in {len(manifest['parts'])} part(s) of {manifest['task_count']} task(s)",
             f"{manifest['auto']} marked auto (above their class's threshold), "
             f"{manifest['predicted'] - manifest['auto']} review", f"manifest: {folder / parts.MANIFEST}"]
    if cfg.merge_file:
        out = folder / default_name(cfg.out_format())
        sibling = parts.merge_file(folder, manifest, out, cfg.out_format())
        lines += [f"predictions: {out}", f"unreadable: {sibling}"]
    logfile.echo("\n".join(lines))
