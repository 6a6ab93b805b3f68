"""The seeded shuffle buffer of the training stream, owned here because bitwise resume depends on it.

A resumed worker replays its stream up to the stored count without decoding (`streams.py`), so the
order must be a pure function of (input order, `bufsize`, `initial`, rng state) and must never change
under an existing run. webdataset's version is the private `webdataset.filters._shuffle`, which any
release may change; these few lines are the same algorithm (as of webdataset 1.0.2, so runs started
before the switch resume identically; `tests/test_shuffle.py` compares the two), written against public
APIs only.

The algorithm, with a list `buffer` and one `rng` draw per yielded sample:

1. Fill: for each sample read, append it; while the buffer holds fewer than `bufsize`, also append the
   sample after it (two in per step, so the buffer grows while samples already come out).
2. Once the buffer holds at least `initial` (at most `bufsize`), yield one sample per step: pick a slot
   uniformly (`rng.randrange(len(buffer))`), yield its sample and move the last sample into the slot.
   At `bufsize` that is one in, one out.
3. Drain: when the input ends, keep picking random slots the same way until the buffer is empty.

A smaller `initial` yields sooner at the cost of a less mixed start; every sample comes out exactly once.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def shuffled(samples: Iterable[T], bufsize: int, initial: int, rng: random.Random) -> Iterator[T]:
    """`samples` in the buffer's random order (algorithm above); deterministic given `rng`'s state."""
    if bufsize < 1:
        raise ValueError(f"shuffle buffer size must be >= 1, got {bufsize}")
    initial = min(initial, bufsize)
    source = iter(samples)
    buffer: list[T] = []
    for sample in source:
        buffer.append(sample)
        if len(buffer) < bufsize:
            buffer.extend(islice(source, 1))  # a second sample while filling (none at the end)
        if len(buffer) >= initial:
            yield _take(buffer, rng)
    while buffer:
        yield _take(buffer, rng)


def _take(buffer: list[T], rng: random.Random) -> T:
    """Remove and return a uniformly chosen sample in O(1): the last sample fills its slot."""
    slot = rng.randrange(len(buffer))
    chosen = buffer[slot]
    buffer[slot] = buffer[-1]
    buffer.pop()
    return chosen
