"""`python -m shards.verify dir=DIR`: check a shard set against its `_info.json`.

Re-hashes every shard and its DALI index, counts its samples, checks every member name against the
key rule, checks the index against the tar's real member offsets (one sample per line, no sample on
two lines), and lists every mismatch; exits 1 on any. A truncated tar can read without error in
WebDataset and silently lose samples: only the manifest catches it.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from shards import config
from shards.config import VerifyConfig
from shards.info import InfoError, ShardEntry, ShardInfo, read_info
from shards.keys import is_key
from shards.writer import index_name, read_index, split_name
from trainer.runtime import cli
from trainer.runtime.exits import EXIT_FAILED
from trainer.runtime.files import sha256_file


def _tar_members(path: Path, decode: bool, num_classes: int) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(name, data offset, size) of every member, plus problems found inside the samples."""
    members, problems = [], []
    with tarfile.open(path, mode="r:") as tar:
        for m in tar:
            if not m.isreg():
                problems.append(f"{path.name}: member {m.name!r} is not a regular file")
                continue
            members.append((m.name, m.offset_data, m.size))
            key, ext = split_name(m.name)
            if not is_key(key) or not ext:
                # WebDataset groups members by this key: a dot, a slash or a space regroups samples
                problems.append(f"{path.name}: member {m.name!r} breaks the key rule: KEY.EXT with a KEY "
                                "of [A-Za-z0-9_-] only")
            if ext == "cls":
                label = tar.extractfile(m).read()
                if not label.isdigit() or int(label) >= num_classes:
                    problems.append(f"{path.name}: {m.name} holds {label[:20]!r}, not a class index")
            elif decode and ext in config.IMAGE_EXTENSIONS:
                from PIL import Image
                try:
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                        im.load()
                except Exception as e:  # noqa: BLE001 - any decoder failure is a finding
                    problems.append(f"{path.name}: {m.name} does not decode: {e}")
    return members, problems


def verify_shard(root: Path, entry: ShardEntry, decode: bool, num_classes: int) -> list[str]:
    name = entry.filename
    path = root / name
    if not path.exists():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry.bytes:
        problems.append(f"{name}: {size} bytes, manifest says {entry.bytes}")
    if sha256_file(path) != entry.sha256:
        problems.append(f"{name}: sha256 differs from the manifest")
    try:
        members, inner = _tar_members(path, decode, num_classes)
    except (tarfile.TarError, OSError, EOFError) as e:
        return problems + [f"{name}: unreadable tar: {e}"]
    problems += inner
    keys = {split_name(m[0])[0] for m in members}
    if len(keys) != entry.num_samples:
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry.num_samples}")
    problems += _check_index(root / (entry.index or index_name(name)), entry.index_sha256, members, len(keys))
    return problems


def _check_index(path: Path, sha256: str | None, members: list[tuple[str, int, int]],
                 num_keys: int) -> list[str]:
    if not path.exists():
        return [f"{path.name}: index file missing"]
    problems = []
    # None: a manifest from before index digests were recorded; the checks below still run
    if sha256 is not None and sha256_file(path) != sha256:
        problems.append(f"{path.name}: sha256 differs from the manifest (edited or stale index)")
    try:
        count, samples = read_index(path)
    except ValueError as e:
        return problems + [f"{path.name}: malformed index: {e}"]
    if count != num_keys:
        problems.append(f"{path.name}: index lists {count} samples, the tar holds {num_keys}")
    entries = [(m.name, m.offset, m.size) for sample in samples for m in sample]
    if sorted(entries) != sorted(members):
        problems.append(f"{path.name}: index offsets or sizes disagree with the tar")
    return problems


def verify(root: Path, decode: bool = False) -> list[str]:
    """Every mismatch between the shard set in `root` and its manifest (empty when sound)."""
    try:
        info = read_info(root)
    except InfoError as err:
        return [str(err)]
    problems, listed = [], set()
    for split in info.splits.values():
        for entry in split.shards:
            listed.add(entry.filename)
            problems += verify_shard(root, entry, decode, len(info.classes))
    problems += [f"{p.name}: shard not in the manifest" for p in sorted(root.glob("*.tar"))
                 if p.name not in listed]
    return problems


def summary(root: Path, problems: list[str]) -> str:
    try:
        info: ShardInfo | None = read_info(root)
    except InfoError:
        info = None
    shards = sum(len(s.shards) for s in info.splits.values()) if info else 0
    samples = sum(s.num_samples for s in info.splits.values()) if info else 0
    return f"verify: {shards} shards, {samples} samples, {len(problems)} problem(s) in {root}"


def run(vc: VerifyConfig) -> int:
    root = Path(vc.dir).expanduser()
    problems = verify(root, vc.decode)
    for p in problems:
        print(f"MISMATCH {p}")
    print(summary(root, problems))
    return EXIT_FAILED if problems else 0


main = cli.tool("verify", VerifyConfig, run, __doc__)

if __name__ == "__main__":
    main()
