"""`Choice`: the base of every enumerated setting, so a schema types its choices and Hydra checks them.

A member is also the string it names (`Backend.dali == "dali"`, `f"{x}"` gives "dali"), so code and
files that compare or write plain strings keep working, and JSON writes the bare value.
"""
from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def names(cls) -> list[str]:
        return [m.value for m in cls]


def plain(config: object) -> dict:
    """A typed config (dataclasses, `Choice`s) as plain, resolved containers: what config.yaml, W&B and
    checkpoints record (`torch.load(weights_only=True)` loads no Enum)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)
