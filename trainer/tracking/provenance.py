"""Provenance in every run directory: what ran, from which code, with which packages, where.

`write()` (rank 0 only) leaves two things in the run directory:
- `config.yaml`: the resolved config of the current start, secrets redacted;
- `provenance/start-<UTC time>.json`: one new file per start, so a requeued or resumed run keeps the
  history of every start (host, argv, git commit, package versions, SLURM allocation) instead of
  overwriting the first one.

Secrets reach a run through config keys (`logger.api_key`), the command line (`logger.api_token=...`,
`--token ...`), environment variables, and plain strings that carry them (a `launcher.setup` line
`export WANDB_API_KEY=...`, a URL in `logger.name`). Redaction therefore works by name *and* by value:
- a key, argument or variable whose *name* looks secret (`SECRET_PATTERN`) has its value replaced;
- inside every recorded string (`redact_text`): the values of environment variables named like secrets
  (`*_KEY`, `*_TOKEN`, `*_SECRET`, `*PASSWORD*`), `NAME=value` / `export NAME=value` assignments to a
  secret-looking name, and URL passwords (`scheme://user:pass@host` keeps the user).
Only `SLURM_*` and `CUDA_VISIBLE_DEVICES` are recorded from the environment: dumping all of it would copy
`WANDB_API_KEY` and friends into every run directory. `redact_config` is what the trainer records
(config.yaml, provenance, checkpoints, W&B) and warns, naming the keys, when a config string held a
secret: the run still uses the real value (the launcher reads the typed config), but the place is wrong.

Provenance is a best-effort record: a missing git, an unreadable repository or an absent package yields
`null`, never an exception that would stop a training job from starting.
"""
from __future__ import annotations

import json
import logging
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

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
SECRET_PATTERN = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
# scheme://user:password@host -> keep the user (useful) and drop the password. Greedy up to the last `@`
# before the path, so a password holding an `@` goes whole.
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^/\s]+@")
# Environment variables whose values are removed from every recorded string. Narrower than
# SECRET_PATTERN because a value is replaced wherever it occurs: SSH_AUTH_SOCK's path or XAUTHORITY
# would blank unrelated text.
SECRET_ENV_PATTERN = re.compile(r"(?:^|_)(?:KEY|TOKEN|SECRET)$|PASSW(?:OR)?D", re.IGNORECASE)
# Shorter values ("1", "true") would blank unrelated text; no real credential is this short.
MIN_SECRET_LEN = 6
# NAME=value, export NAME=value, --name=value inside a string (shell lines, URLs' query strings); an
# unquoted value ends at a shell separator, or at `,`/`]` of a Hydra list on the command line
_ASSIGNMENT = re.compile(r"\b([A-Za-z_][\w.-]*)=(\"[^\"]*\"|'[^']*'|[^\s;&|'\",\]]+)")
PACKAGES = (
    "torch", "torchvision", "webdataset", "hydra-core", "omegaconf", "wandb", "numpy",
    "nvidia-dali-cuda130", "submitit", "timm", "taxotrain",
)
EXTRA_ENV = ("CUDA_VISIBLE_DEVICES",)
GIT_TIMEOUT_S = 10.0


def is_secret_name(name: object) -> bool:
    return SECRET_PATTERN.search(str(name)) is not None


def _strip_url_password(text: str) -> str:
    return _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables, longest first (a key containing another
    goes whole)."""
    env = os.environ if environ is None else environ
    values = {v for n, v in env.items() if SECRET_ENV_PATTERN.search(n) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def _redact_assignment(match: re.Match[str]) -> str:
    name = match.group(1)
    return f"{name}={REDACTED}" if is_secret_name(name) else match.group(0)


def redact_text(text: str, env_values: Sequence[str] | None = None) -> str:
    """`text` without secret environment values, secret-named assignments and URL passwords."""
    for value in secret_env_values() if env_values is None else env_values:
        text = text.replace(value, REDACTED)
    return _strip_url_password(_ASSIGNMENT.sub(_redact_assignment, text))


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
            out.append(redact_text(arg))
    return out


def _redact_value(value: object, env_values: Sequence[str]) -> object:
    if isinstance(value, Mapping):
        return redact_mapping(value, env_values)
    if isinstance(value, str):
        return redact_text(value, env_values)
    if isinstance(value, Sequence | set | frozenset) and not isinstance(value, bytes | bytearray):
        return [_redact_value(v, env_values) for v in value]
    return value


def redact_mapping(d: Mapping, env_values: Sequence[str] | None = None) -> dict:
    """A plain-dict copy with the value of every secret-named key (at any depth) replaced, and every
    string passed through `redact_text`.

    `None` stays `None`: "no key was set" is useful when debugging and reveals nothing.
    """
    env_values = secret_env_values() if env_values is None else env_values
    return {
        key: (REDACTED if value is not None and is_secret_name(key) else _redact_value(value, env_values))
        for key, value in d.items()
    }


def _strings(value: object, path: str) -> list[tuple[str, str]]:
    """(dotted key, string) of every string in a plain config; list items as `key[i]`."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in _strings(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list | tuple):
        return [s for i, v in enumerate(value) for s in _strings(v, f"{path}[{i}]")]
    return []


def redact_config(config: Mapping, *, warn: bool = True) -> dict:
    """`redact_mapping(config)`, warning once (with `warn`) about the keys whose strings held a secret.

    The warning names keys, never values. A secret in `launcher.setup` still reaches the sbatch script
    (it must run there), so the advice is to keep it out of the config altogether.
    """
    env_values = secret_env_values()
    held = [key for key, text in _strings(config, "") if redact_text(text, env_values) != text]
    if warn and held:
        log.warning("%s held a secret (a secret environment variable's value, a NAME=value assignment to "
                    "a secret-looking name, or a URL password): redacted in config.yaml, provenance, "
                    "checkpoints and W&B, but the job still sees it; export it in the job environment "
                    "(e.g. before sbatch) or keep it in ~/.netrc instead of the config",
                    ", ".join(held))
    return redact_mapping(config, env_values)


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
    return {n: REDACTED if is_secret_name(n) else redact_text(os.environ[n]) for n in names}


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
