"""Streaming shards into batches with the same number of steps on every rank, resumable mid-epoch.

The contract every backend keeps (`webdataset` here, `synthetic` below, DALI later):
`loader.batches_per_epoch` is the same on every rank, and `loader.epoch(e, position)` yields exactly
that many (train) `Batch`es of uint8 images [B, 3, H, W] and int64 labels; `loader.close()` ends its
workers (persistent across epochs here: `PassLoader`) and is called on every path out of a run.

How equal steps are guaranteed whatever the shard sizes (the top WebDataset complaint is DDP hanging
at epoch end because ranks got different numbers of batches):
- An epoch is `batches_per_epoch = floor(N / (B * world * accum)) * accum` batches per rank.
- What readers are dealt are pieces: whole shards when there are at least as many shards as the
  `world x workers` slots; with fewer, and an index file for every shard, near-equal ranges of each
  shard's samples (`pieces`; read at the index's offsets), so any number of shards feeds any number of
  readers. Without index files, fewer shards than slots is an error at start.
- The piece order is a permutation drawn from (seed, epoch), the same on every rank and after a
  resume. Pieces are dealt to the slots greedily (next piece to the slot with the fewest samples), so
  slot sizes differ by at most one piece.
- Each slot has a quota of whole batches (the rank's batches split over its workers). A slot streams
  its pieces through a shuffle buffer until the quota is met, starting over on its pieces if they run
  out (a few repeats) and leaving the rest for later epochs if they hold more.
- DataLoader hands out batches round-robin over workers; quotas that differ by at most one keep that
  order exact, which is what makes the position resumable.

Mid-epoch resume: each `Batch` says which (logical) worker made it and how many samples that worker
has taken from its shuffled stream so far. The trainer stores these counts; on resume, each worker
replays its stream without decoding up to that count (the shuffle depends only on the seeded
order), and the workers are rotated so that the round-robin continues where it stopped.
Augmentation is seeded per sample from (seed, epoch, rank, worker, position), so it is reproducible
after a resume, and differs across ranks and workers.

A sample that cannot be decoded is replaced by the next one (the batch stays full), and is reported
in `Batch.bad` each time it is read (a slot that starts over on its pieces reads it again); a shard
whose bad samples, each (shard, key) counted once, exceed `max_bad_fraction` of the samples a reader
takes from it (the whole shard, or that reader's pieces of it) stops the run with the shard named.
Nothing sleeps per bad sample. A `.json` member that does not decode is bad metadata, not a bad
sample: evaluation uses the image with empty metadata and reports it apart (`Batch.bad_meta` and a
warning with the count).
"""
from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from shards.keys import stable_hash
from shards.writer import index_path, read_index
from trainer.data.shardset import Shard, ShardSet
from trainer.data.shuffle import shuffled
from trainer.data.transforms import BadSample, decode
from trainer.runtime.exits import RunFailure

TAR_BLOCK = 512  # a tar member's header; its data follows

log = logging.getLogger(__name__)


class DataError(RunFailure, RuntimeError):
    """The data cannot feed this run (too few shards, a shard too corrupt); names the shard/setting."""


class BadRecord(NamedTuple):
    shard: str
    key: str
    reason: str


class Batch(NamedTuple):
    images: Tensor            # uint8 [B, 3, H, W]
    labels: Tensor            # int64 [B]
    bad: tuple[BadRecord, ...] = ()
    worker: int = 0           # logical worker that made the batch
    consumed: int = 0         # samples that worker has taken from its shuffled stream, this one included
    keys: tuple[str, ...] = ()    # evaluation only: each sample's key, and its `.json` metadata
    meta: tuple[dict, ...] = ()
    bad_meta: tuple[BadRecord, ...] = ()  # evaluation only: samples used with empty metadata


@dataclass
class EpochPosition:
    """Where an epoch stopped: batches done on this rank, and per logical worker its batches/samples.

    `offset` is the batch at which the current worker layout began: 0, unless a run resumed with a
    different world size or worker count, when the rest of the epoch is dealt afresh from there.
    """

    batches: int = 0
    offset: int = 0
    worker_batches: list[int] = field(default_factory=list)
    worker_consumed: list[int] = field(default_factory=list)

    def advance(self, batch: Batch, workers: int) -> None:
        if not self.worker_batches:
            self.worker_batches, self.worker_consumed = [0] * workers, [0] * workers
        self.batches += 1
        self.worker_batches[batch.worker] += 1
        self.worker_consumed[batch.worker] = batch.consumed


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int
    seed: int
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    max_bad_fraction: float = 0.01
    bootstrap_member: int | None = None  # bagging: repeat each sample bootstrap_count(...) times
    bootstrap_seed: int = 0
    fraction: float = 1.0  # learning curves: only samples in_subset(fraction_seed, key, fraction)
    fraction_seed: int = 0


class Piece(NamedTuple):
    """Samples [first, end) of a shard in index order: what one reader is dealt (usually all of it)."""

    shard: Shard
    first: int
    end: int

    @property
    def num_samples(self) -> int:
        return self.end - self.first

    @property
    def whole(self) -> bool:
        return self.first == 0 and self.end == self.shard.num_samples

    @property
    def label(self) -> str:
        """The shard's name, with the range when it is a part (`train-000000.tar[0:3]`)."""
        return self.shard.name if self.whole else f"{self.shard.name}[{self.first}:{self.end}]"


# ---------------------------------------------------------------- planning (pure, tested directly)


def steps_per_epoch(num_samples: int, batch_size: int, world: int, accum: int) -> int:
    """Optimizer steps per epoch: whole global batches only (the remainder is seen in later epochs)."""
    steps = num_samples // (batch_size * world * accum)
    if steps == 0:
        raise DataError(f"{num_samples} training samples cannot fill one global batch of "
                        f"{batch_size} x {world} ranks x {accum} accumulation steps: lower loader.batch_size")
    return steps


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of the pieces (`pieces`): a function of (seed, epoch) only, so every rank
    agrees."""
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    return rng.permutation(num_shards).tolist()


def deal(lengths: Sequence[int], order: Sequence[int], slots: int,
         every_slot: bool = True) -> list[list[int]]:
    """Pieces (indices into `lengths`) per slot: each next one goes to the slot with fewest samples."""
    if every_slot and len(lengths) < slots:
        raise DataError(f"{len(lengths)} shards cannot feed {slots} readers (ranks x loader.workers): "
                        "without an index file (.idx) beside every shard each reader needs a shard of its "
                        "own; use fewer loader.workers, more, smaller shards (shards.build shard.maxcount), "
                        "or shards with index files (shards.build writes them; DALI's wds2idx makes them "
                        "for other tars), which readers share by sample ranges")
    dealt: list[list[int]] = [[] for _ in range(slots)]
    totals = [0] * slots
    for index in order:
        slot = min(range(slots), key=lambda s: (totals[s], len(dealt[s]), s))
        dealt[slot].append(index)
        totals[slot] += lengths[index]
    return dealt


def pieces(shards: Sequence[Shard], slots: int) -> list[Piece]:
    """What the `slots` readers are dealt: every shard whole when there are at least `slots` shards or
    one has no index file; otherwise each shard of n of the N samples cut into ceil(n x slots / N)
    (at most n) near-equal ranges of its index lines, which makes at least `slots` pieces of about
    N / slots samples once N >= slots. Whole shards wherever they suffice: big sets read (and resume)
    as before. Index files count where the manifest records them (then the same on every node, and a
    missing one fails the read by name) or where they are present; so the cut is a function of the
    set and `slots`, the same on every rank and after a resume."""
    whole = [Piece(s, 0, s.num_samples) for s in shards]
    total = sum(s.num_samples for s in shards)
    if len(shards) >= slots or total == 0 or not all(map(_has_index, shards)):
        return whole
    cut: list[Piece] = []
    for shard in shards:
        n = shard.num_samples
        k = min(n, -(-n * slots // total))
        bounds = [n * j // k for j in range(k + 1)] if k else []
        cut += [Piece(shard, a, b) for a, b in zip(bounds, bounds[1:])]
    return cut


def _has_index(shard: Shard) -> bool:
    return shard.index_sha256 is not None or index_path(shard.path).is_file()


def quotas(batches: int, workers: int) -> list[int]:
    """Batches per worker, differing by at most one with the larger ones first (round-robin order)."""
    return [batches // workers + (w < batches % workers) for w in range(workers)]


def sample_seed(*parts: object) -> int:
    return stable_hash("augment", *parts) & 0x7FFF_FFFF_FFFF_FFFF


def bootstrap_count(seed: int, member: int, key: str) -> int:
    """How often a sample appears in a member's bootstrap resample: Poisson(1), drawn from
    (bag seed, member, key) alone, so the resample is the same on every rerun, rank and worker and
    needs no global index (the Poisson form of the bootstrap used for streamed data)."""
    u = stable_hash("bootstrap", seed, member, key) / 2**64
    k, p = 0, math.exp(-1.0)
    cdf = p
    while u >= cdf and k < 20:  # P(k > 20) is below 1e-19
        k += 1
        p /= k
        cdf += p
    return k


def in_subset(seed: int, key: str, fraction: float) -> bool:
    """Whether a training sample belongs to the `fraction` subset: a uniform draw from (seed, key) alone,
    so subsets are nested across fractions, the same on every rank and rerun, and keep about `fraction`
    of every class (stratified in expectation) without a global index or a class listing."""
    # fraction 1 keeps everything even where the float division rounds a hash up to 1.0
    return fraction >= 1 or stable_hash("subset", seed, key) / 2**64 < fraction


# ---------------------------------------------------------------- reading


def read_shard(shard: Shard) -> Iterator[dict]:
    """Raw samples of one local shard (bytes only: nothing is unpickled or decoded here).

    With the index file `shards.build` writes beside the shard, members are read at their offsets;
    without one, the tar is scanned with webdataset's reader."""
    return read_piece(Piece(shard, 0, shard.num_samples))


def read_piece(piece: Piece) -> Iterator[dict]:
    """Raw samples of a piece: the whole shard as `read_shard` says, or index lines [first, end) read at
    their offsets (a range needs the index; the index must list the manifest's sample count)."""
    shard = piece.shard
    index = index_path(shard.path)
    if not piece.whole and not index.is_file():
        raise DataError(f"{index}: missing; reading samples {piece.first}-{piece.end} of {shard.name} "
                        "needs the shard's index file (shards.build writes it)")
    count = 0
    try:
        if not index.is_file():
            samples = _scanned(shard)
        else:  # a whole shard reads every line, so that the count check below sees extra ones too
            samples = _indexed(shard, index, piece.first, None if piece.whole else piece.end)
        for sample in samples:
            sample["__shard__"] = shard.name
            count += 1
            yield sample
    except DataError:
        raise
    except Exception as err:  # OSError, tarfile.TarError, webdataset's grouping errors: all name the shard
        raise DataError(f"{shard.path}: unreadable shard: {err}") from err
    # a tar cut at a member boundary reads without error: only the manifest's count reveals it
    if count != piece.num_samples:
        wanted = (f"the manifest says {shard.num_samples}" if piece.whole
                  else f"expected samples {piece.first}-{piece.end}")
        raise DataError(f"{shard.path}: read {count} samples, {wanted} "
                        "(truncated or rewritten shard; check it with python -m shards.verify)")


def _scanned(shard: Shard) -> Iterator[dict]:
    with open(shard.path, "rb") as fh:
        yield from group_by_keys({**m, "__url__": str(shard.path)} for m in tar_file_iterator(fh))


def _indexed(shard: Shard, index: Path, first: int = 0, end: int | None = None) -> Iterator[dict]:
    """Samples [first, end) (None: to the last line) from the members at the offsets in the shard's DALI
    index. Python's `tarfile` spends ~70 us parsing each member header, 10% of a worker's time per
    image; here each header is only checked to name the member the index expects, so a stale index
    fails loudly instead of feeding wrong bytes."""
    try:
        _, samples = read_index(index)
    except ValueError as err:
        raise DataError(str(err)) from err
    if end is not None and len(samples) != shard.num_samples:
        # a range cannot count what the whole shard gives: the index's length stands in for it
        raise DataError(f"{index}: lists {len(samples)} samples, the manifest says {shard.num_samples} "
                        f"for {shard.name} (stale index or rewritten shard; check it with python -m "
                        "shards.verify)")
    with open(shard.path, "rb") as fh:
        # line 1 holds the version and count
        for number, members in enumerate(samples[first:end], start=first + 2):
            sample: dict = {"__url__": str(shard.path)}
            for ext, offset, size, name in members:
                fh.seek(max(0, offset - TAR_BLOCK))
                block = fh.read(TAR_BLOCK + size)
                problem = _header_problem(block, offset, name, size)
                if problem:
                    raise DataError(f"{shard.path}: no member {name} at offset {offset} (from {index.name}, "
                                    f"line {number}): {problem}; truncated shard or stale index? check it "
                                    "with python -m shards.verify")
                sample[ext] = block[TAR_BLOCK:]
            sample["__key__"] = name[: -len(ext) - 1]
            yield sample


def _header_problem(block: bytes, offset: int, name: str, size: int) -> str | None:
    """Why `block` (512 header bytes, then the data) is not the member the index line describes: the
    offset must be a block boundary after a header that gives that name and that size. Two field reads
    (~3 us a member) instead of `tarfile`'s full parse; the header checksum is left out (~10 us a
    member here), as a header that names the member at a block boundary is one in all but a crafted tar,
    and a crafted header would carry a valid checksum too."""
    if offset < TAR_BLOCK or offset % TAR_BLOCK:
        return "not a tar block boundary"
    if len(block) != TAR_BLOCK + size:
        return "the file ends first"
    found = _member_name(block)
    if found != name:
        return f"the tar header there names {found!r}"
    given = _octal(block[124:136])
    if given != size:
        return f"the tar header there gives {given} bytes, the index {size}"
    return None


def _octal(field: bytes) -> int | None:
    """A numeric ustar header field (NUL- or space-terminated octal); None when it is not one."""
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None


def _member_name(block: bytes) -> str:
    """The member name in a tar header (ustar: a 155-byte prefix + a 100-byte name for long names)."""
    name, prefix = block[:100].split(b"\0", 1)[0], block[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")


class BadCounter:
    """Per-shard bad-sample accounting; raises once a shard is past the allowed fraction.

    Each (shard, key) counts once: a slot that starts over on its pieces, or a bootstrap repeat,
    reads the same bad sample again, and 8 reads of 5 bad samples are 5 bad samples.

    The fraction is of the samples this reader takes from the shard: all of them for whole shards, the
    sum of its pieces of it for ranges. A reader sees only its own pieces (other workers and ranks
    read the rest), and a shard over the limit always has a reader over it on its part; a part over
    it stops the run even where the shard as a whole would pass."""

    def __init__(self, parts: Sequence[Shard | Piece], max_fraction: float) -> None:
        self.lengths: dict[str, tuple[int, Path, int]] = {}  # name: (samples counted, path, shard's)
        for part in parts:
            piece = part if isinstance(part, Piece) else Piece(part, 0, part.num_samples)
            taken, _, _ = self.lengths.get(piece.shard.name, (0, None, 0))
            self.lengths[piece.shard.name] = (taken + piece.num_samples, piece.shard.path,
                                              piece.shard.num_samples)
        self.max_fraction = max_fraction
        self.counts: dict[str, int] = {}
        self.seen: set[tuple[str, str]] = set()

    def add(self, record: BadRecord) -> bool:
        """Counts `record` unless its sample was counted before; whether it was new."""
        if (record.shard, record.key) in self.seen:
            return False
        self.seen.add((record.shard, record.key))
        n = self.counts[record.shard] = self.counts.get(record.shard, 0) + 1
        length, path, whole = self.lengths[record.shard]
        if n > self.max_fraction * length:
            whose = (f"its {length} samples" if length == whole
                     else f"the {length} of its {whole} samples that one reader takes")
            raise DataError(f"{path}: {n} of {whose} are unusable, more than "
                            f"data.max_bad_fraction={self.max_fraction} "
                            f"(latest: {record.key}: {record.reason})")
        return True


# ---------------------------------------------------------------- training stream


class TrainStream(IterableDataset):
    """One rank's training stream; each DataLoader worker serves one logical slot of the epoch."""

    def __init__(self, shardset: ShardSet, transform: Callable[[Tensor], Tensor], cfg: StreamConfig,
                 rank: int, world: int, workers: int, batches_per_epoch: int) -> None:
        super().__init__()
        self.shards, self.num_classes = shardset.shards, shardset.num_classes
        self.transform, self.cfg = transform, cfg
        self.rank, self.world, self.workers = rank, world, max(1, workers)
        self.batches_per_epoch = batches_per_epoch
        slots = self.world * self.workers
        self.pieces = pieces(self.shards, slots)
        if len(self.pieces) < slots and shardset.num_samples < slots:  # no cut can help
            raise DataError(f"{shardset.num_samples} training samples cannot give each of {slots} readers "
                            "(ranks x loader.workers) one sample: use fewer loader.workers")
        # Where the next pass starts: [epoch, batches, offset, worker_batches.., worker_consumed..] in
        # shared memory. Persistent DataLoader workers (`PassLoader`) hold the copy of this stream made
        # when they were forked, so attributes set later never reach them; these pages do (fork: the
        # same memory), and each worker reads them when the DataLoader starts it on a pass, after
        # `set_epoch` wrote them (the start travels through a queue, so the write is seen).
        self._start = torch.zeros(3 + 2 * self.workers, dtype=torch.int64).share_memory_()
        self.set_epoch(0, None)  # deals the pieces: too few for the readers is an error here, at start

    def set_epoch(self, epoch: int, position: EpochPosition | None) -> None:
        pos, zeros = position or EpochPosition(), [0] * self.workers
        self._start.copy_(torch.tensor([epoch, pos.batches, pos.offset, *(pos.worker_batches or zeros),
                                        *(pos.worker_consumed or zeros)], dtype=torch.int64))
        self._follow()

    def _follow(self) -> None:
        """This process's epoch, position and deal, from the shared start (`set_epoch`)."""
        start, w = self._start.tolist(), self.workers
        self.epoch = start[0]
        self.position = EpochPosition(start[1], start[2], start[3:3 + w], start[3 + w:])
        order = shard_order(len(self.pieces), self.cfg.seed, self.epoch)
        dealt = deal([p.num_samples for p in self.pieces], order, self.world * self.workers)
        self.slots = dealt[self.rank * self.workers:(self.rank + 1) * self.workers]

    def __iter__(self) -> Iterator[Batch]:
        self._follow()  # a persistent worker learns the pass's epoch and position here
        info = get_worker_info()
        running = info.num_workers if info else 1
        if running != self.workers:
            raise DataError(f"stream built for {self.workers} workers, run by {running}")
        # rotate: the worker that made the next batch before the stop goes first again
        pos = self.position
        logical = ((info.id if info else 0) + (pos.batches - pos.offset)) % self.workers
        quota = quotas(self.batches_per_epoch - pos.offset, self.workers)[logical]
        done = pos.worker_batches[logical] if pos.worker_batches else 0
        skip = pos.worker_consumed[logical] if pos.worker_consumed else 0
        yield from self._batches(logical, quota - done, skip)

    def _shuffled(self, logical: int) -> Iterator[dict]:
        mine = [self.pieces[i] for i in self.slots[logical]]
        rng = random.Random(stable_hash("shuffle", self.cfg.seed, self.epoch, self.rank, logical))

        member, bag_seed = self.cfg.bootstrap_member, self.cfg.bootstrap_seed
        fraction, subset_seed = self.cfg.fraction, self.cfg.fraction_seed

        def cycle() -> Iterator[dict]:
            while True:  # start over when the slot's pieces run out before its quota
                yielded = 0
                for piece in mine:
                    for sample in read_piece(piece):
                        key = sample["__key__"]
                        if not in_subset(subset_seed, key, fraction):
                            continue  # the subset first, then the bootstrap resample of the subset
                        repeats = 1 if member is None else bootstrap_count(bag_seed, member, key)
                        for _ in range(repeats):
                            yielded += 1
                            yield sample
                if yielded == 0:
                    raise DataError(f"shards {[p.label for p in mine]} yield no samples"
                                    + (f" in bootstrap member {member}" if member is not None else "")
                                    + (f" in the data.fraction={fraction} subset: use fewer loader.workers "
                                       "or a larger fraction" if fraction < 1 else ""))

        return shuffled(cycle(), self.cfg.shuffle_buffer, self.cfg.shuffle_initial, rng)

    def _batches(self, logical: int, remaining: int, skip: int) -> Iterator[Batch]:
        stream = self._shuffled(logical)
        for _ in range(skip):  # replay up to the resume point without decoding
            next(stream)
        counter = BadCounter([self.pieces[i] for i in self.slots[logical]], self.cfg.max_bad_fraction)
        position = skip
        items: list = []
        labels: list[int] = []
        bad: list[BadRecord] = []
        for _ in range(remaining):
            while len(items) < self.cfg.batch_size:
                sample = next(stream)
                position += 1
                try:
                    seed = sample_seed(self.cfg.seed, self.epoch, self.rank, logical, position)
                    item, label = self._prepare(sample, seed)
                    items.append(item)
                    labels.append(label)
                except BadSample as err:
                    record = BadRecord(sample["__shard__"], sample.get("__key__", "?"), str(err))
                    bad.append(record)
                    counter.add(record)
            labels_t = torch.tensor(labels, dtype=torch.int64)
            yield self._assemble(items, labels_t, tuple(bad), logical, position)
            items, labels, bad = [], [], []

    def _prepare(self, sample: dict, seed: int) -> tuple[Tensor, int]:
        """One sample's (augmented uint8 image, label); `BadSample` when it cannot be used."""
        image, label = decode(sample, self.num_classes)
        return seeded(self.transform, image, seed), label

    def _assemble(self, items: list, labels: Tensor, bad: tuple[BadRecord, ...], logical: int,
                  position: int) -> Batch:
        return Batch(torch.stack(items), labels, bad, logical, position)


def seeded(transform: Callable[[Tensor], Tensor], image: Tensor, seed: int) -> Tensor:
    """`transform(image)` with its random draws seeded by `seed`, leaving the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only (what the transforms draw from, whatever the image's device):
        # torch.manual_seed also queues a lazy CUDA seed on CUDA builds, 11% of a worker's time per image
        torch.default_generator.manual_seed(seed)
        return transform(image)


# ---------------------------------------------------------------- evaluation stream


class EvalStream(IterableDataset):
    """Every sample of the split exactly once across ranks x workers; the last batch may be short.

    Batches carry each sample's key and `.json` metadata (class, source path, per-sample features)
    for prediction and feature export; a `.json` that does not decode gives {} and a `bad_meta`
    record. `labelled=False` reads samples without a `.cls` (label -1).
    """

    def __init__(self, shardset: ShardSet, transform: Callable[[Tensor], Tensor], batch_size: int,
                 rank: int, world: int, workers: int, max_bad_fraction: float,
                 labelled: bool = True) -> None:
        super().__init__()
        self.shards, self.num_classes = shardset.shards, shardset.num_classes
        self.transform, self.batch_size, self.max_bad = transform, batch_size, max_bad_fraction
        self.workers, self.labelled = max(1, workers), labelled
        slots = world * self.workers
        # no shuffle: a fixed deal of sample ranges where shards are too few (indexed sets); a reader
        # without a piece (fewer samples or unindexed shards than readers) simply idles: evaluation has
        # no collective per batch, so uneven counts cannot hang
        self.pieces = pieces(self.shards, slots)
        lengths = [p.num_samples for p in self.pieces]
        dealt = deal(lengths, sorted(range(len(lengths)), key=lambda i: -lengths[i]), slots, every_slot=False)
        self.slots = dealt[rank * self.workers:(rank + 1) * self.workers]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        mine = [self.pieces[i] for i in self.slots[info.id if info else 0]]
        counter = BadCounter(mine, self.max_bad)
        images: list[Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        meta: list[dict] = []
        bad: list[BadRecord] = []
        bad_meta: list[BadRecord] = []
        reported_meta = 0
        for piece in mine:
            shard = piece.shard
            for sample in read_piece(piece):
                key = sample.get("__key__", "?")
                try:
                    image, label = decode(sample, self.num_classes, self.labelled)
                    image = self.transform(image)
                except BadSample as err:
                    bad.append(BadRecord(shard.name, key, str(err)))
                    counter.add(bad[-1])
                else:
                    images.append(image)
                    labels.append(label)
                    keys.append(key)
                    meta.append(_metadata_or_empty(sample, shard.name, bad_meta))
                if len(images) == self.batch_size:
                    yield Batch(torch.stack(images), torch.tensor(labels), tuple(bad), keys=tuple(keys),
                                meta=tuple(meta), bad_meta=tuple(bad_meta[reported_meta:]))
                    images, labels, keys, meta, bad = [], [], [], [], []
                    reported_meta = len(bad_meta)
        if images or bad:  # bad metadata always comes with an image
            yield Batch(torch.stack(images) if images else torch.empty(0, dtype=torch.uint8),
                        torch.tensor(labels, dtype=torch.int64), tuple(bad), keys=tuple(keys),
                        meta=tuple(meta), bad_meta=tuple(bad_meta[reported_meta:]))
        if bad_meta:
            first = bad_meta[0]
            log.warning("%d sample(s) of %s have a .json member that does not decode: used with empty "
                        "metadata (bad metadata, not bad samples), e.g. %s/%s: %s", len(bad_meta),
                        ", ".join(sorted({b.shard for b in bad_meta})), first.shard, first.key, first.reason)


class BadMetadata(ValueError):
    """A sample's `.json` does not decode: its image and label may still be sound."""


def sample_metadata(sample: dict) -> dict:
    """The `.json` member written by `shards.build` (JSON only: nothing from a shard is unpickled)."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:  # bytes that are not UTF-8 included
        raise BadMetadata(f".json is not valid UTF-8 JSON: {err}") from err
    if not isinstance(meta, dict):
        raise BadMetadata(".json is not an object")
    return meta


def _metadata_or_empty(sample: dict, shard: str, bad_meta: list[BadRecord]) -> dict:
    """The sample's metadata, or {} with a record in `bad_meta`: metadata is a by-product of an
    evaluation, and an unreadable one must not drop a sound image (nor stop a run as a bad sample)."""
    try:
        return sample_metadata(sample)
    except BadMetadata as err:
        bad_meta.append(BadRecord(shard, sample.get("__key__", "?"), str(err)))
        return {}


# ---------------------------------------------------------------- loaders (the contract)


def _quiet_worker(_: int) -> None:
    # preemption signals are for the training process; a worker killed by SIGTERM would turn a clean
    # checkpoint-and-exit into a "DataLoader worker exited unexpectedly" crash
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _loader(dataset: IterableDataset, workers: int, pin_memory: bool, prefetch: int,
            persistent: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=_quiet_worker if workers else None,
                      prefetch_factor=prefetch if workers else None, persistent_workers=persistent,
                      # its own generator: creating an epoch's iterator must not consume the global
                      # RNG, or a resumed run's dropout stream would differ from the uninterrupted one
                      generator=torch.Generator(),
                      multiprocessing_context="fork" if workers else None)


class PassLoader:
    """One DataLoader for every pass over an iterable stream (`iter()` starts a pass), and `close()`.

    With `persistent` and workers, the worker processes live from the first pass to `close()`: each
    pass restarts them on the stream (torch's `persistent_workers`) instead of forking, starting and
    joining new ones, a fixed cost per epoch (issue 18; benchmarks/epoch_overhead.py). A stream whose
    passes differ (the training epochs) tells its workers through shared memory (`TrainStream.set_epoch`);
    one pass at a time: a new pass drops what the last one had not delivered. Without `persistent`,
    every pass has its own workers, gone when its iterator is (the behaviour before)."""

    def __init__(self, dataset: IterableDataset, workers: int, pin_memory: bool = False, prefetch: int = 2,
                 persistent: bool = True) -> None:
        self.dataset, self.workers, self.pin_memory, self.prefetch = dataset, workers, pin_memory, prefetch
        self.persistent = persistent and workers > 0
        self._loader: DataLoader | None = None
        self._iterator: Iterator | None = None

    def __iter__(self) -> Iterator:
        if not self.persistent:
            return iter(_loader(self.dataset, self.workers, self.pin_memory, self.prefetch))
        if self._loader is None:
            self._loader = _loader(self.dataset, self.workers, self.pin_memory, self.prefetch, True)
        self._iterator = iter(self._loader)  # the same iterator every pass, its workers restarted
        return self._iterator

    def close(self) -> None:
        """Ends the persistent workers now (idempotent). torch has no public call for it: they end when
        the iterator is collected, which an exception's traceback holding a frame can put off past the
        run; `_shutdown_workers` is that collection's own method (asked for, not assumed)."""
        iterator, self._iterator, self._loader = self._iterator, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class ShardLoader:
    """The webdataset backend: `epoch(e, position)` -> exactly `batches_per_epoch` training batches.

    One epoch at a time (the next `epoch()` call restarts the workers); `close()` ends them."""

    def __init__(self, stream: TrainStream, workers: int, pin_memory: bool = False,
                 prefetch: int = 2, persistent: bool = True) -> None:
        self.stream, self.workers = stream, workers
        self.batches_per_epoch = stream.batches_per_epoch
        self.passes = PassLoader(stream, workers, pin_memory, prefetch, persistent)

    def epoch(self, epoch: int, position: EpochPosition | None = None) -> Iterator[Batch]:
        self.stream.set_epoch(epoch, position)  # before the pass starts: its workers read it then
        remaining = self.batches_per_epoch - (position.batches if position else 0)
        count = 0
        for batch in self.passes:
            count += 1
            yield batch
        if count != remaining:  # the contract is the whole point: fail loudly rather than hang a peer
            raise DataError(f"epoch {epoch}: loader gave {count} batches, expected {remaining}")

    def close(self) -> None:
        self.passes.close()


def eval_batches(stream: EvalStream, workers: int, pin_memory: bool = False) -> Iterator[Batch]:
    yield from _loader(stream, workers, pin_memory, 2)


class SyntheticLoader:
    """Random uint8 images with the same contract: a throughput baseline without any input cost."""

    def __init__(self, num_samples: int, num_classes: int, batch_size: int, crop_size: int,
                 batches_per_epoch: int, seed: int, rank: int) -> None:
        gen = torch.Generator().manual_seed(stable_hash("synthetic", seed, rank) & 0x7FFF_FFFF)
        self.images = torch.randint(0, 256, (batch_size, 3, crop_size, crop_size), dtype=torch.uint8,
                                    generator=gen)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
        self.batches_per_epoch = batches_per_epoch
        self.num_samples = num_samples

    def epoch(self, epoch: int, position: EpochPosition | None = None) -> Iterator[Batch]:
        start = position.batches if position else 0
        for i in range(start, self.batches_per_epoch):
            yield Batch(self.images, self.labels, (), 0, (i + 1) * len(self.labels))

    def close(self) -> None:
        """Nothing to end: the contract's `close()` (workers, pipelines) for the other backends."""
