"""The log file of a run: `<folder>/<tool>.log`, everything the console shows, with a timestamp per line.

Hydra sets the console up (`hydra/job_logging: stdout`: bare messages on stdout, no file, so that N
ranks do not write N files into the working directory). A tool learns its output folder only once its
config is judged, so its run body calls `attach(folder, tool, main)` then (a file on rank 0 only); the
file stays attached until the process ends.

The file gets every log record from INFO up (the root logger's level decides, which Hydra sets to INFO;
a library caller's own setting is left alone), every Python warning (a hook beside the
usual display, which stays as it was) and what a tool prints as its result (`echo`). Nothing else: the
console already shows no secrets, so neither does the file. It is appended to, never replaced: a
requeued job or a rerun continues it, each start marked by a header line. Appending cannot be atomic
like `files.atomic_write`; a line torn by a kill is ended before the next start writes.

`stamp_console()` gives console lines a timestamp too when stdout is not a terminal (a SLURM log, a
pipe): a batch log without times cannot say when anything happened.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any

DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"  # local ISO time to the second
_LEVEL = logging.INFO
_attached: list[LogFile] = []
_show_warning: Any = None  # warnings.showwarning before our hook


class StampedFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message>`, the time repeated on every line of a multi-line record
    (a traceback, a table), so that each line of the file can be sorted and grepped by time."""

    def __init__(self, with_origin: bool = True) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if with_origin else "%(message)s",
                         datefmt=DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, self.datefmt)
        return "\n".join(f"{stamp} {line}" for line in super().format(record).splitlines() or [""])


class LogFile:
    """One attached file handler; `close()` detaches it (idempotent)."""

    def __init__(self, path: Path, tool: str, handler: logging.FileHandler) -> None:
        self.path, self.tool, self.handler = path, tool, handler

    def close(self) -> None:
        detach(self)

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_path(folder: Path | str, tool: str) -> Path:
    return Path(folder).expanduser().resolve() / f"{tool}.log"


def attach(folder: Path | str, tool: str, main: bool) -> LogFile | None:
    """Append the root logger's records to `<folder>/<tool>.log` until the process ends; None on any
    rank but the main one. One file per tool and process: attaching the same file again returns its
    handle, another folder for the same tool ends the previous file (the next member of a bag trained
    in-process). Not detached when the run body returns, so that the error `cli` logs after it (exit 1
    or 2) is in the file too."""
    if not main:
        return None
    path = log_path(folder, tool)
    for known in list(_attached):
        if known.path == path:
            return known
        if known.tool == tool:
            detach(known)
    path.parent.mkdir(parents=True, exist_ok=True)
    _end_torn_line(path)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(StampedFormatter())
    handler.setLevel(_LEVEL)
    logging.getLogger().addHandler(handler)
    handle = LogFile(path, tool, handler)
    _attached.append(handle)
    _hook_warnings()
    handler.handle(_record(logging.INFO, f"---- {tool} started: pid {os.getpid()} on {socket.gethostname()}"))
    return handle


def detach(handle: LogFile | None) -> None:
    if handle is None or handle not in _attached:
        return
    _attached.remove(handle)
    logging.getLogger().removeHandler(handle.handler)
    handle.handler.close()
    if not _attached:
        _unhook_warnings()


def echo(text: str) -> None:
    """Print a tool's result to stdout, as before, and put it into the log files as well: the attached
    ones and any other file of the root logger (Hydra's own, where a tool keeps Hydra's default)."""
    print(text, flush=True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(_record(logging.INFO, text))


def stamp_console() -> None:
    """A timestamp before each console line of the root logger's handlers that write to a stream other
    than a terminal and do not show a time already (Hydra's `stdout` job logging shows bare messages)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
            continue
        fmt = getattr(handler.formatter, "_fmt", None) or ""
        stream = getattr(handler, "stream", None)
        if "asctime" in fmt or isinstance(handler.formatter, StampedFormatter) or _is_tty(stream):
            continue
        handler.setFormatter(StampedFormatter(with_origin=False))


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def _record(level: int, text: str, name: str = "taxotrain") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 0, "%s", (text,), None)


def _end_torn_line(path: Path) -> None:
    """A job killed mid-write can leave a last line without its newline: end it, so the next line is whole."""
    try:
        with open(path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        return


def _hook_warnings() -> None:
    """Our hook in front of whatever displays warnings now; again if someone restored the display since
    (a `warnings.catch_warnings` block ending puts back what it found, which drops our hook)."""
    global _show_warning
    if warnings.showwarning is not _show_and_record:
        _show_warning = warnings.showwarning
        warnings.showwarning = _show_and_record


def _unhook_warnings() -> None:
    global _show_warning
    if _show_warning is not None and warnings.showwarning is _show_and_record:
        warnings.showwarning = _show_warning
    _show_warning = None


def _show_and_record(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: Any = None, line: str | None = None) -> None:
    """The usual display, then the same text into every attached file."""
    _show_warning(message, category, filename, lineno, file, line)
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    for handle in list(_attached):
        handle.handler.handle(_record(logging.WARNING, text, "py.warnings"))
