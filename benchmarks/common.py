"""What every benchmark prints (its machine, its rows as a markdown table), and how it runs a tool."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dali_version() -> str:
    try:
        from nvidia import dali
    except ImportError:
        return "not installed"
    return dali.__version__


def machine() -> str:
    """CPU model, usable cores, GPU, and the versions that decide the numbers."""
    import torch
    import torchvision

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {cores} usable cores ({os.cpu_count()} online), {gpu}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, DALI {dali_version()}, "
            f"Python {platform.python_version()}")


def fmt(x: float | None, spec: str) -> str:
    """`x` formatted, or "-" where there is no number."""
    return "-" if x is None else format(x, spec)


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; a column whose name ends in ">" is right-aligned (the ">" is dropped)."""
    names = [c.rstrip(">") for c in columns]
    rule = ["---:" if c.endswith(">") else "---" for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tool(*args: str) -> None:
    """One taxotrain command, as a user types it; its output goes to this process's."""
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True)
