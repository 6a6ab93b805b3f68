"""What may change when a run is resumed: the one table, and the comparison the Trainer makes with it.

A checkpoint continues *one* run. Settings that decide what each step computes (the network, the data
each step sees, the batch, the optimizer and the lr schedule's shape) are FIXED: a changed value would
train another run under the old one's name (the checkpoint's optimizer and schedule state would win
silently, and config.yaml would record a value the run never used), so the resume is refused, naming
every changed key with both values. Everything else is FREE: how long to train, how often to log,
evaluate and checkpoint, where and how the processes run. Free changes are applied and listed in one
warning; a new length (`trainer.max_steps`/`epochs`) rebuilds the lr schedule for the new total from
the resume step on, and the Trainer's warning says how the lr moves (`trainer.schedule.resume`).

Rows match a dotted key or everything under it; the longest match wins. A key that no row matches is
treated as FIXED (fail closed), and tests/test_resume_policy.py checks that every key of `TrainConfig`
has a row, so a new setting forces a decision here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR

from trainer import schedule
from trainer.checkpoint import CheckpointError

FIXED, FREE = "fixed", "free"

# key (or prefix) -> policy. Why FIXED: the column names what a changed value would change.
POLICY: dict[str, str] = {
    "model": FIXED,                     # the network (also checked by TrainingState.check_resume)
    "model.freeze": FIXED,              # which parameters train: the optimizer's groups and their state
    # the data each step sees, and how it is augmented and normalised
    "data": FIXED,
    # where the set lies, not what it holds: a job may copy its shards to node-local scratch and be
    # requeued with another path; the classes are checked (TrainingState.check_resume), the move is listed
    "data.shards": FREE,
    "data.check": FREE,                 # only how shards are verified before training
    "data.max_bad_fraction": FREE,      # only when an unreadable shard stops the run
    "loader": FREE,                     # workers, prefetch, pinning, DALI threads: speed only
    "loader.backend": FIXED,            # another sampler and augmentation implementation
    "loader.batch_size": FIXED,         # the batch: lr scaling, steps per epoch, BN statistics
    # the optimizer and the lr schedule's shape (scaled lr, warmup, decay)
    "optim": FIXED,
    # the loss itself: per-class weights and the logit shift change every gradient (trainer/imbalance.py)
    "optim.class_weight": FIXED,
    "optim.logit_adjust_tau": FIXED,
    "optim.backbone_lr_scale": FIXED,   # the backbone's lr: another param group layout and lr
    "schedule": FIXED,
    "trainer": FREE,                    # how long, how often, how the processes run
    "trainer.seed": FIXED,              # data order, augmentation and dropout streams
    "logger": FREE,
    "launcher": FREE,
    "paths": FREE,
    "run_dir": FREE,                    # a moved run directory
}
WORLD_SIZE = "world size"  # not a config key: the ranks, part of the global batch (the lr's scaling)
_MISSING = "<not recorded>"


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def policy(key: str) -> str:
    """The policy of the longest row that is `key` or a prefix of it; FIXED where none is."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        row = POLICY.get(".".join(parts[:n]))
        if row is not None:
            return row
    return FIXED


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """Dotted leaf keys of a plain config; lists are values (data.scale is one setting)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differences(old: Mapping, new: Mapping) -> list[Change]:
    """Every leaf key whose value differs, or which only one of the configs has."""
    a, b = flatten(old), flatten(new)
    return [Change(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys())
            if a.get(k, _MISSING) != b.get(k, _MISSING)]


def check(old: Mapping, new: Mapping, old_world: int, world: int, held: str) -> list[Change]:
    """The FREE changes from the checkpoint's config `old` to `new`; a CheckpointError naming every FIXED
    one. `held` says which run the checkpoint is (named in the error).

    A key the checkpoint does not record (written before the key existed) cannot be compared and is
    FREE: refusing would make every new setting end the resumption of older runs.
    """
    changes = differences(old, new)
    if old_world != world:
        changes.append(Change(WORLD_SIZE, old_world, world))
    fixed = [c for c in changes if c.old != _MISSING and policy(c.key) == FIXED]
    if fixed:
        listing = "\n  ".join(map(str, fixed))
        raise CheckpointError(
            f"{held}; these settings cannot change when it resumes (they decide what each step "
            f"computes, trainer/resume.py):\n  {listing}\nuse the checkpoint's values, or another run_dir "
            f"for a new run")
    return changes


def announce(changes: list[Change], schedule_note: str | None, step: int) -> str | None:
    """The one warning of a resume that changed FREE settings or the lr schedule; None when none did."""
    if not changes and schedule_note is None:
        return None
    listing = "; ".join(map(str, changes)) or "none"
    text = f"resuming at step {step} with changed settings, applied from here on: {listing}"
    return f"{text}. {schedule_note}" if schedule_note else text


def continue_schedule(scheduler: LambdaLR, saved: dict, recipe: Mapping, peak_lr: float
                      ) -> tuple[str | None, list[dict]]:
    """Restore `scheduler` from `saved` with the current length (`trainer.schedule.resume`). Returns the
    sentence saying how the lr changed (None if it did not) and the run's record of such changes: the
    checkpoint recipe's `lr_schedule_changes` plus this one, {step, before, after}."""
    rebuilt, old = schedule.resume(scheduler, saved)
    history = list(recipe.get("lr_schedule_changes", []))
    if not rebuilt:
        return None, history
    new, step = scheduler.lr_lambdas[0], saved["last_epoch"]
    history.append({"step": step, "before": str(old), "after": str(new)})
    return schedule.describe_change(old, new, step, peak_lr), history
