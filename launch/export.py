"""`python -m launch.export bag=DIR [members=[a,b]] [checkpoint=best|latest] [out=DIR]`: pickle-free export.

Writes each member of a bag (`bag.json`), or one run directory, as `<name>.safetensors` + `<name>.json`
and a `bag.json` listing them into `out` (default `<bag>/export`); see trainer/export.py for the format
and `load_exported` / `load_exported_bag` / `preprocess` for using it. Exit codes: 0 done; 2 bad
configuration (a missing bag, no checkpoint, a corrupt checkpoint, unknown members).
"""
# ruff: noqa: E402 - the preemption signals are recorded before the heavy imports below
from __future__ import annotations

from trainer import preempt

preempt.listen_early()

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launch.exits import USAGE_ERRORS, guarded
from shards.config import ConfigError
from trainer.checkpoint import CheckpointError
from trainer.export import export_bag

log = logging.getLogger("launch.export")


@dataclass
class ExportConfig:
    bag: str = "???"                # a bag directory (bag.json) or one training run directory
    members: list[str] = field(default_factory=list)  # a subset by name; empty: every member
    checkpoint: str = "best"        # best (by validation top-1; the newest if there is none) | latest
    out: str | None = None          # default: <bag>/export

    def __post_init__(self) -> None:
        if self.checkpoint not in ("best", "latest"):
            raise ConfigError(f"checkpoint: must be best or latest, got {self.checkpoint!r}")


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def run(cfg: ExportConfig) -> int:
    out, metas = export_bag(Path(cfg.bag), cfg.members, cfg.checkpoint, Path(cfg.out) if cfg.out else None)
    names = ", ".join(f"{m['name']} ({m['model']}, step {m['step']})" for m in metas)
    print(f"exported {names} to {out}; load with trainer.export.load_exported_bag({str(out)!r})")
    return 0


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(raw: DictConfig) -> None:
    sys.exit(guarded(lambda: run(OmegaConf.to_object(raw)), log, (*USAGE_ERRORS, CheckpointError)))


if __name__ == "__main__":
    main()
