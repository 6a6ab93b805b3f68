"""Who a W&B run is: project, entity, group, name, job type and tags.

W&B shows a bag as one thing only if all its runs say so: every member, evaluation and export shares
`group` (the bag's folder name unless `logger.group` says otherwise), `job_type` says what the run did,
and readable names (`<bag>/member-01`, `<bag>/evaluate-test`) replace W&B's random ones. The tools
fill what `logger.*` leaves null (`trainer/jobs/bag.py`, `trainer/loop.py`,
`trainer/inference/wandb_report.py`); this module holds the rules they share and knows no schema.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEFAULT_PROJECT = "taxotrain"
MAX_TAG_LEN = 64  # W&B refuses longer tags (and the run with them)


class LoggerSettings(Protocol):
    """What this module reads of `trainer.config.LoggerConfig` (the tracking room imports no schema)."""

    project: str | None
    entity: str | None
    group: str | None
    name: str | None
    job_type: str | None
    tags: list[str]


@dataclass(frozen=True)
class Identity:
    """The W&B fields of one run; passed to `Tracker` as keywords (`**identity.kwargs()`)."""

    project: str
    entity: str | None
    group: str | None
    name: str | None
    job_type: str
    tags: tuple[str, ...]

    def kwargs(self) -> dict[str, object]:
        return {"project": self.project, "entity": self.entity, "group": self.group, "name": self.name,
                "job_type": self.job_type, "tags": self.tags}


def tags(*parts: str | Iterable[str] | None) -> tuple[str, ...]:
    """Non-empty strings of `parts` (strings or lists of them), first occurrence kept, cut to W&B's limit.

    Automatic tags come from names (a timm model, an experiment preset) that can be longer than a tag."""
    seen: dict[str, None] = {}
    for part in parts:
        for tag in [part] if isinstance(part, str) or part is None else part:
            if tag:
                seen.setdefault(str(tag)[:MAX_TAG_LEN], None)
    return tuple(seen)


def hydra_choice(group: str) -> str | None:
    """The option chosen for config group `group` (`experiment=demo` -> "demo") when Hydra composed this
    process's config, else None (a library caller, a SLURM job started by Submitit)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(group)
    return None if choice in (None, "null") else str(choice)


def training(logger: LoggerSettings, run_dir: Path, model: str) -> Identity:
    """A training run: group and name default to its run_dir's folder name (a bag's members get theirs
    from `trainer/jobs/bag.py`), tags to the experiment preset, the model and `logger.tags`."""
    folder = Path(run_dir).resolve().name
    return Identity(project=logger.project or DEFAULT_PROJECT, entity=logger.entity,
                    group=logger.group or folder, name=logger.name or folder,
                    job_type=logger.job_type or "train",
                    tags=tags(hydra_choice("experiment"), model, logger.tags))


def derived_id(purpose: str, settings: Mapping[str, object]) -> str:
    """A W&B run id that is a function of `settings`: the same settings resume the same run, any other
    value starts another. 16 hex digits of a sha256 (W&B ids allow letters, digits, `-` and `_`)."""
    text = json.dumps({"purpose": purpose, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
