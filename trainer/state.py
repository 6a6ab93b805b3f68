"""`TrainingState`: what a training checkpoint holds, with a format version, read through one accessor.

The trainer writes `TrainingState(...).to_dict()` through `trainer.checkpoint.Checkpointer` and reads
it back with `TrainingState.read_latest`; inference (`trainer.inference.members`, `.export`) reads a
chosen file with `TrainingState.read`. All three end in `from_dict`, the only place that knows the
keys, so a checkpoint is checked the same way whoever opens it.

The saved dict carries `"format": FORMAT` and `"version": VERSION`. Bump VERSION when a field is added,
removed or changes meaning, and teach `from_dict` to read the older layout. A file written by a newer
taxotrain (a higher version) is refused rather than half read.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from trainer.checkpoint import Checkpointer, CheckpointError

# field -> the types a loaded value may have; weights_only unpickling returns only these containers
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (dict,), "optimizer": (dict,), "scheduler": (dict,), "scaler": (dict, type(None)),
    "step": (int,), "epoch": (int,), "position": (dict,), "rng": (list, tuple),
    "wandb_id": (str, type(None)), "classes": (list, tuple), "config": (dict,), "recipe": (dict,),
}


@dataclass(frozen=True)
class TrainingState:
    """One rank-0 snapshot of a run; tensors and plain containers only (loads with weights_only=True)."""

    model: dict[str, Tensor]           # the bare network's state_dict (no DDP/compile prefix)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None      # GradScaler state with fp16, else None
    step: int                          # optimizer steps completed
    epoch: int
    position: dict[str, Any]           # data position of every rank and worker (Trainer._save)
    rng: list[dict[str, Any]]          # trainer.rng.capture() of every rank, in rank order
    wandb_id: str | None
    classes: tuple[str, ...]           # class names in label order
    config: dict[str, Any]             # the resolved training config (trainer.runtime.choices.plain)
    recipe: dict[str, Any]             # derived lr, batch and schedule (trainer.schedule.describe)

    FORMAT: ClassVar[str] = "taxotrain-checkpoint"
    VERSION: ClassVar[int] = 1

    @property
    def model_name(self) -> str:
        """The torchvision architecture (`model.name` of the run's config); checked by `from_dict`."""
        return self.config["model"]["name"]

    def to_dict(self) -> dict[str, Any]:
        """The dict to save: every field plus `format` and `version`."""
        out: dict[str, Any] = {"format": self.FORMAT, "version": self.VERSION}
        out.update((f.name, getattr(self, f.name)) for f in fields(self))
        out["classes"] = list(self.classes)  # as checkpoints always held them
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Path) -> TrainingState:
        """The record in `d`, a dict loaded from the checkpoint file `source` (named in every error).

        Version 0: a checkpoint written before the format was versioned has neither `format` nor
        `version` but the same twelve fields, and is read as they are. A version newer than VERSION,
        another `format`, or a missing or mistyped field is a CheckpointError naming `source` and the key.
        """
        version = _version(d, source)
        values: dict[str, Any] = {}
        for name, types in _TYPES.items():
            if name not in d:
                raise CheckpointError(f"{source}: field {name!r} is missing (format version {version})")
            value = d[name]
            if not isinstance(value, types) or isinstance(value, bool):
                wanted = " or ".join(t.__name__ for t in types)
                raise CheckpointError(f"{source}: field {name!r} is a {type(value).__name__}, not {wanted}")
            values[name] = value
        values["classes"] = tuple(values["classes"])
        if not all(isinstance(c, str) for c in values["classes"]):
            raise CheckpointError(f"{source}: field 'classes' holds non-string names")
        model_config = values["config"].get("model")
        name = model_config.get("name") if isinstance(model_config, dict) else None
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{source}: field 'config' has no model.name (the architecture)")
        return cls(**values)

    @classmethod
    def read(cls, path: Path) -> TrainingState:
        """One checkpoint file, verified against its marker (`Checkpointer.load`), as a record."""
        return cls.from_dict(Checkpointer.load(path), Path(path))

    @classmethod
    def read_latest(cls, checkpoints: Checkpointer) -> TrainingState | None:
        """The newest checkpoint that loads (walking back past corrupt ones), or None if there is none."""
        found = checkpoints.load_newest()
        return None if found is None else cls.from_dict(found[1], found[0])

    def check_resume(self, model_name: str, classes: Sequence[str], run_dir: Path) -> None:
        """CheckpointError unless a run of `model_name` over `classes` can continue this one.

        Called before `load_state_dict`, whose missing/unexpected-key traceback would not say that the
        command and the run directory simply describe two different runs.
        """
        held = f"run_dir={str(run_dir)!r} holds a {self.model_name} run (step {self.step})"
        if model_name != self.model_name:
            raise CheckpointError(f"{held}; this command trains {model_name}: use another run_dir or "
                                  f"model.name={self.model_name}")
        if tuple(classes) != self.classes:
            raise CheckpointError(f"{held} over {len(self.classes)} classes; this command's data has "
                                  f"{len(classes)}: {_class_difference(self.classes, tuple(classes))}; "
                                  f"use another run_dir or the shards that run was trained on")


def _version(d: dict[str, Any], source: Path) -> int:
    if "format" not in d and "version" not in d:
        return 0  # written before checkpoints were versioned: the same fields, unlabelled
    if d.get("format") != TrainingState.FORMAT:
        raise CheckpointError(f"{source}: not a {TrainingState.FORMAT} file (format {d.get('format')!r})")
    version = d.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{source}: field 'version' is {version!r}, not a format version")
    if version > TrainingState.VERSION:
        raise CheckpointError(f"{source}: format version {version} was written by a newer taxotrain; this "
                              f"one reads versions up to {TrainingState.VERSION}: upgrade taxotrain")
    return version


def _class_difference(held: tuple[str, ...], wanted: tuple[str, ...]) -> str:
    only_held = [c for c in held if c not in wanted]
    only_wanted = [c for c in wanted if c not in held]
    if not only_held and not only_wanted:
        return "the same names in another order (labels would mean other classes)"
    parts = [f"{label} {names[:5]}{' ...' if len(names) > 5 else ''}"
             for label, names in (("only in the checkpoint:", only_held), ("only in the data:", only_wanted))
             if names]
    return ", ".join(parts)
