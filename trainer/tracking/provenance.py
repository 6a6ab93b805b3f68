"""Provenance in every run directory: what ran, from which code, with which packages, where.

`write()` (rank 0 only) leaves two things in the run directory:
- `config.yaml`: the resolved config of the current start, secrets redacted;
- `provenance/start-<UTC time>.json`: one new file per start, so a requeued or resumed run keeps the
  history of every start (host, argv, git commit, package versions, SLURM allocation) instead of
  overwriting the first one.

Secrets reach a run through three doors, and all three are redacted by *name*, never by guessing at
values: config keys (`logger.api_key`), the command line (`logger.api_token=...`, `--token ...`) and
environment variables. Only `SLURM_*` and `CUDA_VISIBLE_DEVICES` are recorded from the environment:
dumping all of it would copy `WANDB_API_KEY` and friends into every run directory. Passwords embedded in
URLs (`https://user:pass@host`) are stripped wherever a string is recorded.

Provenance is a best-effort record: a missing git, an unreadable repository or an absent package yields
`null`, never an exception that would stop a training job from starting.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from trainer.runtime.files import atomic_write

REDACTED = "<redacted>"
SECRET_PATTERN = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
# scheme://user:password@host -> keep the user (useful) and drop the password.
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^/\s@]+@")
PACKAGES = (
    "torch", "torchvision", "webdataset", "hydra-core", "omegaconf", "wandb", "numpy",
    "nvidia-dali-cuda130", "submitit", "taxotrain",
)
EXTRA_ENV = ("CUDA_VISIBLE_DEVICES",)
GIT_TIMEOUT_S = 10.0


def is_secret_name(name: object) -> bool:
    return SECRET_PATTERN.search(str(name)) is not None


def _strip_url_password(text: str) -> str:
    return _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """Replace the value of every secret-named argument: `a.api_key=v`, `--token=v` and `--token v`."""
    out: list[str] = []
    redact_next = False
    for arg in argv:
        if redact_next and not arg.startswith("-"):
            out.append(REDACTED)
            redact_next = False
            continue
        redact_next = False
        name, eq, _ = arg.partition("=")
        if eq and is_secret_name(name):
            out.append(f"{name}={REDACTED}")
        else:
            # A bare `--token` flag: its value is the next argument. Over-redacting a boolean flag's
            # neighbour is harmless; leaking the value is not.
            redact_next = arg.startswith("-") and not eq and is_secret_name(arg)
            out.append(_strip_url_password(arg))
    return out


def _redact_value(value: object) -> object:
    if isinstance(value, Mapping):
        return redact_mapping(value)
    if isinstance(value, str):
        return _strip_url_password(value)
    if isinstance(value, Sequence | set | frozenset) and not isinstance(value, bytes | bytearray):
        return [_redact_value(v) for v in value]
    return value


def redact_mapping(d: Mapping) -> dict:
    """A plain-dict copy with the value of every secret-named key (at any depth) replaced.

    `None` stays `None`: "no key was set" is useful when debugging and reveals nothing.
    """
    return {
        key: (REDACTED if value is not None and is_secret_name(key) else _redact_value(value))
        for key, value in d.items()
    }


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    """`git -C <this package> ...`, or None when git cannot run at all (absent, hung)."""
    try:
        return subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), *args],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict[str, object]:
    """Commit and dirty flag of the repository holding this package's source, or nulls.

    A non-editable install in a git-ignored venv inside some checkout would otherwise report that
    checkout's commit, hence the check-ignore (exit 0 = ignored, 1 = not ignored).
    """
    head = _git("rev-parse", "HEAD")
    ignored = _git("check-ignore", "-q", str(Path(__file__).resolve()))
    if head is None or head.returncode != 0 or ignored is None or ignored.returncode != 1:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return {"commit": head.stdout.strip(), "dirty": dirty}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cuda_info() -> dict[str, object]:
    import torch  # the trainer imports torch anyway; kept local so redaction helpers stay light

    if not torch.cuda.is_available():
        return {"cuda": torch.version.cuda, "cudnn": None, "gpus": []}
    return {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def launch_env() -> dict[str, str]:
    """`SLURM_*` and `CUDA_VISIBLE_DEVICES`, recorded (not interpreted: distributed.py does that)."""
    names = sorted(n for n in os.environ if n.startswith("SLURM_"))
    names += [n for n in EXTRA_ENV if n in os.environ]
    return {n: REDACTED if is_secret_name(n) else _strip_url_password(os.environ[n]) for n in names}


def _plain(config: Mapping) -> dict:
    """Resolve an OmegaConf config (interpolations included) into plain containers."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    return dict(config)


def _new_start_path(directory: Path, now: datetime) -> Path:
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    path, n = directory / f"start-{stamp}.json", 1
    while path.exists():  # two starts within one second (tests, instant requeue): never overwrite
        n += 1
        path = directory / f"start-{stamp}-{n}.json"
    return path


def collect(config: Mapping, *, world_size: int, rank: int, now: datetime) -> dict[str, object]:
    return {
        "time_utc": now.isoformat(),
        "hostname": socket.gethostname(),
        "python": sys.version,
        "executable": sys.executable,
        "argv": redact_argv(sys.argv),
        "cwd": os.getcwd(),
        "git": git_state(),
        "packages": package_versions(),
        "torch_cuda": cuda_info(),
        "world_size": world_size,
        "rank": rank,
        "env": launch_env(),
        "config": redact_mapping(_plain(config)),
    }


def write(run_dir: Path, config: Mapping, *, world_size: int, rank: int) -> Path:
    """Write `config.yaml` and a new `provenance/start-*.json`; returns the provenance file's path."""
    from omegaconf import OmegaConf

    run_dir, now = Path(run_dir), datetime.now(timezone.utc)
    record = collect(config, world_size=world_size, rank=rank, now=now)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(record["config"])))
    path = _new_start_path(run_dir / "provenance", now)
    # default=str: an odd config value (a Path, an enum) must not cost the whole record.
    atomic_write(path, json.dumps(record, indent=2, default=str) + "\n")
    return path
