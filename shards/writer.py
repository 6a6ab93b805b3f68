"""Write one shard: a plain ustar tar, its DALI index, and a sidecar with its result.

A shard is written through `trainer.runtime.files.atomic_path` (hidden temporary, fsync, rename), so
an interrupted build never leaves a file that looks complete. The sidecar (`_parts/NAME.json`) lets
a re-run skip shards whose bytes still match and lets the final step write the manifest without
re-reading the shards.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from shards.images import BadImage, prepare
from shards.items import NO_STATUS, Item, Reject, class_of
from shards.plan import ShardPlan
from trainer.runtime.files import SpecialFile, TooLarge, atomic_path, atomic_write, read_regular, sha256_file

# 2000-01-01T00:00:00Z: a fixed time (and owner) makes rebuilds byte-identical
MTIME = 946684800
PARTS = "_parts"


@dataclass(frozen=True)
class WriteOptions:
    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    max_side: int | None
    quality: int
    max_pixels: int


@dataclass
class ShardResult:
    name: str
    split: str
    plan: str
    num_samples: int = 0
    bytes: int = 0
    sha256: str = ""
    index_sha256: str = ""    # the .idx file: its lines decide which bytes are a sample's label
    class_counts: dict[str, int] = field(default_factory=dict)
    rejects: list[list[str]] = field(default_factory=list)   # Reject fields (4 in sidecars without status)
    notes: list[list[str]] = field(default_factory=list)     # [path, what changed]
    skipped: bool = False

    @classmethod
    def load(cls, path: Path) -> ShardResult:
        return cls(**json.loads(path.read_text()))


def index_name(shard_name: str) -> str:
    return shard_name[: -len(".tar")] + ".idx"


def index_path(shard: Path) -> Path:
    return shard.with_name(index_name(shard.name))


class IndexEntry(NamedTuple):
    """One member in a DALI v1.2 index line ("ext offset size name" per member, a line per sample)."""

    ext: str
    offset: int  # of the member's data, after its 512-byte tar header
    size: int
    name: str


def split_name(name: str) -> tuple[str, str]:
    """(key, ext) of a member name, split as WebDataset groups and DALI's wds2idx indexes: at the first
    dot after the last `/`."""
    head, sep, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return head + sep + stem, ext


def read_index(path: Path) -> tuple[int, list[list[IndexEntry]]]:
    """(the sample count of line 1, each sample line's members); `ValueError` names the file and line.

    Each line must be one sample (every member of one key, each ext the one its name gives, no ext
    twice) and no key may come back on another line: otherwise two lines that swapped their `.cls`
    entries would train on each other's labels, and a repeated line would feed one sample twice."""
    lines = path.read_text().splitlines()
    head = lines[0] if lines else ""
    version, _, count = head.partition(" ")
    if version != "v1.2" or not count.isdigit():
        raise ValueError(f"{path}:1: expected 'v1.2 <samples>', got {head[:80]!r}")
    samples: list[list[IndexEntry]] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        groups = list(zip(*[iter(fields)] * 4, strict=False))
        if not fields or len(fields) % 4 or not all(o.isdigit() and n.isdigit() for _, o, n, _ in groups):
            raise ValueError(f"{path}:{number}: expected groups of 'ext offset size name', got {line[:80]!r}")
        entries = [IndexEntry(ext, int(offset), int(size), name) for ext, offset, size, name in groups]
        problem = _line_problem(entries, number, first_line)
        if problem:
            raise ValueError(f"{path}:{number}: {problem}")
        samples.append(entries)
    if len(samples) != int(count):
        raise ValueError(f"{path}:1: says {count} samples, the file lists {len(samples)}")
    return int(count), samples


def _line_problem(entries: list[IndexEntry], number: int, first_line: dict[str, int]) -> str | None:
    """What makes one index line not exactly one new sample; records its key in `first_line`."""
    keys = sorted({split_name(e.name)[0] for e in entries})
    if len(keys) != 1:
        return f"members of {len(keys)} samples on one line: {keys[:3]}"
    wrong = [e for e in entries if split_name(e.name)[1] != e.ext]
    if wrong:
        return f"member {wrong[0].name!r} listed as {wrong[0].ext!r}"
    if len({e.ext for e in entries}) != len(entries):
        return f"sample {keys[0]!r} lists a member twice"
    if keys[0] in first_line:
        return f"sample {keys[0]!r} again (first on line {first_line[keys[0]]})"
    first_line[keys[0]] = number
    return None


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _metadata(item: Item, opts: WriteOptions, ext: str) -> bytes:
    meta = {"path": item.rel, "image": ext}
    if item.labelled:
        meta["class"] = opts.classes[item.label]
    if item.source_id:
        meta["id"] = item.source_id  # the source's own id (EcoTaxa object_id): predictions are keyed by it
    if item.status != NO_STATUS:
        meta["status"] = item.status
    if opts.feature_names:
        # NaN is not JSON: an unmeasured feature is null
        meta["features"] = {n: (None if math.isnan(v) else v)
                            for n, v in zip(opts.feature_names, item.features)}
    return json.dumps(meta, sort_keys=True, ensure_ascii=True, allow_nan=False).encode()


def _up_to_date(plan: ShardPlan, out: Path) -> ShardResult | None:
    side = out / PARTS / f"{plan.name}.json"
    if not side.exists():
        return None
    try:
        old = ShardResult.load(side)
    except (ValueError, TypeError):
        return None
    if old.plan != plan.digest:
        return None
    if old.num_samples == 0:
        return old
    shard, index = out / plan.name, out / index_name(plan.name)
    # a sidecar from before index digests were recorded is rewritten: its index was never checked
    if not (shard.exists() and index.exists() and old.index_sha256):
        return None
    if sha256_file(index) != old.index_sha256:
        return None
    return old if sha256_file(shard) == old.sha256 else None

# an input file larger than this is quarantined unread (the largest image a 89 Mpx limit allows is far
# smaller, even as an uncompressed TIFF)
MAX_INPUT_BYTES = 1 << 30


class _NothingWritten(Exception):
    """Every input of the shard was quarantined: the temporary is dropped, not published."""


def write_shard(plan: ShardPlan, out: Path, opts: WriteOptions) -> ShardResult:
    done = _up_to_date(plan, out)
    if done is not None:
        done.skipped = True
        return done
    result = ShardResult(plan.name, plan.split, plan.digest)
    try:
        with atomic_path(out / plan.name) as tmp:
            index_lines = _write_tar(plan, tmp, opts, result)
            if result.num_samples == 0:
                raise _NothingWritten
            # DALI index v1.2, the format of DALI's wds2idx: "ext offset size name" per member; written
            # before its shard, which `atomic_path` publishes last
            result.index_sha256 = atomic_write(out / index_name(plan.name),
                                               f"v1.2 {len(index_lines)}\n" + "\n".join(index_lines) + "\n")
            result.bytes = tmp.stat().st_size
            result.sha256 = sha256_file(tmp)
    except _NothingWritten:
        # no empty shard (or a stale one of an earlier build) for readers to trip over
        (out / plan.name).unlink(missing_ok=True)
        (out / index_name(plan.name)).unlink(missing_ok=True)
    atomic_write(out / PARTS / f"{plan.name}.json", json.dumps(asdict(result), indent=1))
    return result


def _write_tar(plan: ShardPlan, tmp: Path, opts: WriteOptions, result: ShardResult) -> list[str]:
    """The shard's samples into `tmp`; returns the index lines, one per sample written."""
    index_lines = []
    # ustar, not PAX: DALI's reader once failed on PAX headers (DALI #3640)
    with tmp.open("wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for item in plan.items:
            members = _sample_members(item, plan.split, opts, result)
            if not members:
                continue
            parts = []
            for name, data in members:
                # one 512-byte header per member (short ASCII names): data follows it
                parts.append(f"{name.split('.', 1)[1]} {tar.offset + 512} {len(data)} {name}")
                tar.addfile(_member(name, len(data)), io.BytesIO(data))
            index_lines.append(" ".join(parts))
    return index_lines


def _sample_members(item: Item, split: str, opts: WriteOptions, result: ShardResult):
    """The sample's (name, bytes) members; None when the image is quarantined. No `.cls` for an item
    of the unlabelled set: a reader that expects a label fails on it instead of inventing one."""
    cls_name = class_of(opts.classes, item.label)
    try:
        # a FIFO named like an image would block the build forever, /dev/zero fill the memory
        data = read_regular(Path(item.path), MAX_INPUT_BYTES)
        enc = prepare(data, item.rel, opts.max_side, opts.quality, opts.max_pixels)
    except (SpecialFile, TooLarge) as e:
        reason = f"not a regular file ({e.kind})" if isinstance(e, SpecialFile) else e.reason
        result.rejects.append(_reject(item, split, cls_name, reason))
        return None
    except (OSError, BadImage) as e:
        reason = str(e) if isinstance(e, BadImage) else f"unreadable file: {e.strerror or e}"
        result.rejects.append(_reject(item, split, cls_name, reason))
        return None
    if enc.note:
        result.notes.append([item.rel, enc.note])
    result.num_samples += 1
    result.class_counts[cls_name] = result.class_counts.get(cls_name, 0) + 1
    label = [(f"{item.key}.cls", str(item.label).encode())] if item.labelled else []
    return [(f"{item.key}.{enc.ext}", enc.data), *label, (f"{item.key}.json", _metadata(item, opts, enc.ext))]


def _reject(item: Item, split: str, cls_name: str, reason: str) -> list[str]:
    return list(asdict(Reject(item.rel, split, cls_name, reason, item.status)).values())
