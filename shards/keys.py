"""Sample keys that survive WebDataset grouping, tar headers and every file system."""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY = re.compile(r"[A-Za-z0-9_-]+")
# ustar names are limited to 100 bytes: key + "." + the longest extension ("json") must fit
MAX_SLUG = 60


def slug(text: str) -> str:
    """ASCII letters, digits, `_` and `-` only: WebDataset splits a key at its first dot."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _UNSAFE.sub("_", ascii_text).strip("_")[:MAX_SLUG] or "x"


def is_key(text: str) -> bool:
    """Whether `text` keeps the key rule (`[A-Za-z0-9_-]`, non-empty) that every key made here keeps."""
    return _KEY.fullmatch(text) is not None


def key_from_path(rel_path: str) -> str:
    """Readable and unique: a slug of the path plus a short hash of the exact path.

    The hash keeps `a b.jpg` and `a_b.jpg` (same slug) apart; the slug keeps keys traceable.
    """
    stem = rel_path.rsplit(".", 1)[0] if "." in rel_path.rsplit("/", 1)[-1] else rel_path
    digest = hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:10]
    return f"{slug(stem)}-{digest}"


def key_from_id(object_id: str) -> str:
    """A user-given id (e.g. EcoTaxa object_id) made safe; two ids with one slug collide on purpose
    and are reported as duplicate keys rather than silently renamed."""
    return slug(object_id)


def stable_hash(*parts: object) -> int:
    """Deterministic across processes and Python versions (unlike `hash()`)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Part:
    """The share of the inputs that one array task of a partitioned build lists (`partition=true`).

    Taken by key hash, not by position: two rows of one id land in the same task, whose duplicate
    check sees both, and each task's share is a uniform sample of the collection (every class in the
    proportion it has overall), so a shard cut from one share is as mixed as one cut from the whole."""

    index: int = 0
    count: int = 1

    def takes(self, key: str) -> bool:
        return self.count == 1 or stable_hash("partition", key) % self.count == self.index


WHOLE = Part()  # every input: a build that is not partitioned
