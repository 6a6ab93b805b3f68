"""A head's W&B run: one run in its bag's group with `job_type=head`, beside the members and evaluations.

Named `<bag>/head-<kind>-<inputs>`, its id a function of the head's settings and folders (a rerun resumes
it). Summary: the head's metrics under evaluate's names; tables: per class, and the comparison rows that
`compare.md` shows; images: the reliability diagram and, when there is one, the learning curve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.heads.config import HeadRunConfig
from trainer.heads.report import SUMMARY_KEYS
from trainer.inference.wandb_report import bag_identity
from trainer.runtime.choices import plain
from trainer.runtime.exits import ConfigError
from trainer.tracking import identity
from trainer.tracking.tracker import Tracker, jsonable


def _cell(value: object) -> object:
    out = jsonable(value)
    return None if out in ("nan", "inf", "-inf") else out


def payload(wandb: Any, report: dict, files: dict[str, Path], curve: Path | None) -> dict[str, object]:
    rows = report["per_class"]
    out: dict[str, object] = {
        "per_class": wandb.Table(columns=list(rows[0]), data=[[_cell(v) for v in r.values()] for r in rows]),
        "reliability": wandb.Image(str(files["reliability"])),
    }
    if report["pairs"]:
        out["pairs"] = wandb.Table(columns=["class_a", "class_b", "n", "accuracy"],
                                   data=[[report["classes"][p["a"]], report["classes"][p["b"]], p["n"],
                                          _cell(p["accuracy"])] for p in report["pairs"]])
    if curve is not None and curve.is_file():
        out["learning_curve"] = wandb.Image(str(curve))
    return out


def who_is(cfg: HeadRunConfig, bag: Path, members: list[str], name: str) -> identity.Identity:
    """The bag's group, project and tags as its members recorded them; where the bag is gone (features
    outlive it), the bag's folder name as the group and the defaults."""
    try:
        return bag_identity(bag, members, cfg.logger, name, "head")
    except ConfigError:
        logger = cfg.logger
        return identity.Identity(project=logger.project or identity.DEFAULT_PROJECT, entity=logger.entity,
                                 group=logger.group or bag.name, name=logger.name or name,
                                 job_type=logger.job_type or "head", tags=identity.tags(logger.tags))


def log_head(cfg: HeadRunConfig, report: dict, files: dict[str, Path], out: Path, described: dict) -> None:
    if cfg.logger.mode == "disabled":
        return
    bag = Path(described["bag"])
    name = report["head"]
    who = who_is(cfg, bag, list(described["members"]), f"{bag.name}/head-{name}")
    settings = {"head": plain(cfg), "features": described["features"], "out": str(out.resolve())}
    values = report["model"][name]
    with Tracker(out, is_main=True, mode=str(cfg.logger.mode), config={"head": jsonable(plain(cfg))},
                 run_id=identity.derived_id("head", settings), keep_id=False, **who.kwargs()) as tracker:
        tracker.summary({f"{name}/{k}": values[k] for k in SUMMARY_KEYS})
        curve = out / "head_curve.png" if cfg.curve else None
        tracker.log_wandb(lambda wandb: payload(wandb, report, files, curve), step=0)
