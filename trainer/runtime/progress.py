"""One progress reporter for every tool: count, total, rate, ETA and the wall-clock time of the end.

On a terminal (stderr a TTY) a tqdm bar; everywhere else (a SLURM log, a pipe) a plain INFO line at
most every `every_s` seconds, plus one at the end, such as

    predict 1,280/10,000 (12.8%) 41.3 img/s, eta 0:03:31 (2025-03-01T14:05:31)

While a bar is drawn, log records go through `tqdm.write` (`logging_redirect_tqdm`), so a validation
line or a warning lands above the bar instead of through it.

Rates use `time.monotonic` (an NTP step must not make a rate negative); the end time is local wall-clock
time to the second. The rate is the mean since the reporter was made (count `start`), or with
`start=None` since the first count it saw: a pause inside the work (training's validation, a slow shard)
is part of the ETA, start-up before that point (loading a model, compiling) is not.

Distributed: only the rank that passes `enabled=True` (rank 0) reports. An evaluation stream deals
shards to ranks, so rank 0 knows only its own count; with `scale=world` it reports its count times the
world size, marked `~` as an estimate, against the total of all ranks.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def clock_text(seconds: float) -> str:
    """`H:MM:SS` (with days past 24 h) of a non-negative duration."""
    return str(datetime.timedelta(seconds=round(seconds)))


def rate_text(rate: float) -> str:
    """Three significant digits, without an exponent: 0.0123, 41.3, 1,234."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def wall_text(timestamp: float) -> str:
    """Local ISO time to the second."""
    return datetime.datetime.fromtimestamp(timestamp).isoformat(timespec="seconds")


class Progress:
    """Reports `count` of `total` (None: unknown) for one piece of work; `close()` on every path
    (or use it as a context manager, or `track` an iterable)."""

    def __init__(self, what: str, total: int | None = None, *, every_s: float = 30.0, unit: str = "img",
                 enabled: bool = True, scale: int = 1, bar: bool | None = None, start: int | None = 0,
                 logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
        self.enabled, self.scale, self.logger = enabled, max(1, scale), logger
        self._clock, self._wall = clock, wall
        self._bar_wanted = bar
        self._bar: Any = None
        self._redirect: contextlib.ExitStack | None = None
        # (time, count) the rate is measured from
        self._first: tuple[float, int] | None = None if start is None else (clock(), start)
        self._last_line = -math.inf
        self._logged: int | None = None  # the count of the last line written
        self.count = start or 0
        self.text = ""
        self.closed = False

    # ---------------------------------------------------------------- counting

    def advance(self, n: int, text: str = "") -> None:
        """`n` more done."""
        self.update(self.count + n, text)

    def update(self, count: int, text: str = "", total: int | None = None) -> None:
        """`count` done so far (this rank's own, see `scale`); `text` follows the numbers."""
        if not self.enabled or self.closed:
            return
        now = self._clock()
        if self._first is None:
            self._first = (now, count)
        self.count, self.text = count, text
        if total is not None:
            self.total = total
        if self._use_bar():
            self._draw(text)
            return
        finished = self.total is not None and count * self.scale >= self.total
        if finished and self._logged != count:  # the end always shows, once
            self._emit(now, done=True)
        elif not finished and now - self._last_line >= self.every_s:
            self._emit(now, done=False)

    def track(self, items: Iterable[_T], size: Callable[[_T], int]) -> Iterator[_T]:
        """`items`, counting `size(item)` after each one is handed out; closes at the end or on a break."""
        try:
            for item in items:
                yield item
                self.advance(size(item))
        finally:
            self.close()

    def close(self) -> None:
        """The last line (or the bar's end); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            self._redirect.close()
        elif self.enabled and self._logged != self.count:
            self._emit(self._clock(), done=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- the plain line

    def _emit(self, now: float, done: bool) -> None:
        self._last_line, self._logged = now, self.count
        self.logger.info("%s", self.line(now, done))

    def rate(self, now: float) -> float | None:
        """Counted per second since the first count (all ranks' with `scale`); None before any time passed."""
        if self._first is None:
            return None
        elapsed, done = now - self._first[0], (self.count - self._first[1]) * self.scale
        return done / elapsed if elapsed > 0 and done > 0 else None

    def line(self, now: float, done: bool = False) -> str:
        """`what count/total (pct) rate unit/s, eta H:MM:SS (end time) text`."""
        count, est = self.count * self.scale, "~" if self.scale > 1 else ""
        if self.total is not None:
            count = min(count, self.total)  # an estimate, or a last batch used in part: never past the total
        parts = [f"{self.what} {est}{count:,}" + (f"/{self.total:,}" if self.total is not None else "")]
        if self.total:
            parts[0] += f" ({100 * count / self.total:.1f}%)"
        rate = self.rate(now)
        parts.append(f"{rate_text(rate)} {self.unit}/s" if rate else f"? {self.unit}/s")
        if done:
            finished = self.total is None or count >= self.total
            took = clock_text(now - self._first[0]) if self._first else "0:00:00"
            parts[-1] += f", done in {took}" if finished else f", stopped after {took}"
        elif self.total is not None and rate:
            left = max(0.0, (self.total - count) / rate)
            parts[-1] += f", eta {clock_text(left)} ({wall_text(self._wall() + left)})"
        else:
            parts[-1] += ", eta ?"
        return " ".join([*parts, self.text]).rstrip()

    # ---------------------------------------------------------------- the terminal bar

    def _use_bar(self) -> bool:
        if self._bar_wanted is None:
            self._bar_wanted = sys.stderr.isatty()
        return self._bar_wanted

    def _draw(self, text: str) -> None:
        if self._bar is None:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = contextlib.ExitStack()
            # log records through tqdm.write while the bar is up: above it, not across it
            self._redirect.enter_context(logging_redirect_tqdm())
            self._bar = tqdm(total=self.total, initial=self.count * self.scale, desc=self.what,
                             unit=self.unit, dynamic_ncols=True, file=sys.stderr)
        self._bar.total = self.total
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(self.count * self.scale - self._bar.n)  # update() keeps tqdm's redraw throttling


def of_ranks(what: str, total: int | None, every_s: float, main: bool, world: int, unit: str = "img"
             ) -> Progress:
    """A tool's reporter (`progress_every_s` of its schema, 0: none): rank 0 reports its own count times
    the world size against the total of all ranks, the other ranks nothing."""
    return Progress(what, total, every_s=every_s, unit=unit, enabled=main and every_s > 0, scale=world)
