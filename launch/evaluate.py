"""`python -m launch.evaluate bag=DIR data.shards=DIR [split=test]`: each member and the ensemble.

Loads every member of a bag (`bag.json`) or a single run directory, from its best checkpoint (or
its newest: `checkpoint=latest`), with `weights_only=True`; runs them on the same batches,
combines their probabilities (`combine=mean|geometric`) and writes `report.json` and `report.md`
into the bag directory (or `out=DIR`). Runs in-process, under torchrun or as srun tasks: every
sample is evaluated exactly once across ranks and the metrics are summed with one all_reduce.
"""
# ruff: noqa: E402 - the preemption signals are recorded before the heavy imports below
from __future__ import annotations

from trainer import preempt

preempt.listen_early()

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from shards.config import ConfigError
from trainer import data, distributed, shardset
from trainer.ensemble import COMBINE, ProbabilityMetrics, combine
from trainer.members import load_bag
from trainer.provenance import write_text_atomic
from trainer.tracker import jsonable
from trainer.transforms import AugmentConfig, eval_transform

log = logging.getLogger("launch.evaluate")
SUMMARY_KEYS = ("top1", "top5", "mrr", "balanced_acc", "nll", "ece", "n")


@dataclass
class EvalData:
    shards: str = "???"
    split: str = "test"


@dataclass
class EvaluateConfig:
    bag: str = "???"                # a bag directory (bag.json) or one training run directory
    data: EvalData = field(default_factory=EvalData)
    members: list[str] = field(default_factory=list)  # a subset by name; empty: every member
    checkpoint: str = "best"        # best (by validation top-1; the newest if there is none) | latest
    combine: str = "mean"           # mean | geometric (of the members' probabilities)
    exclude_classes: list[str] = field(default_factory=list)  # true classes left out of the summary
    batch_size: int = 64
    workers: int = 2
    out: str | None = None          # default: the bag directory
    dist_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.checkpoint not in ("best", "latest"):
            raise ConfigError(f"checkpoint: must be best or latest, got {self.checkpoint!r}")
        if self.combine not in COMBINE:
            raise ConfigError(f"combine: must be one of {list(COMBINE)}, got {self.combine!r}")
        if self.batch_size <= 0 or self.workers < 0:
            raise ConfigError("batch_size must be > 0 and workers >= 0")


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


@torch.no_grad()
def evaluate(cfg: EvaluateConfig, rank: int, world: int, device: torch.device) -> dict:
    members = load_bag(cfg.bag, cfg.members, cfg.checkpoint, device)
    split = shardset.load(cfg.data.shards, cfg.data.split)
    for m in members:
        if m.classes != list(split.classes):
            raise ConfigError(f"member {m.name} was trained on other classes than {cfg.data.shards}")
    first = members[0].config["data"]
    aug = AugmentConfig(first["crop_size"], eval_crop_ratio=first["eval_crop_ratio"])
    stream = data.EvalStream(split, eval_transform(aug), cfg.batch_size, rank, world, cfg.workers,
                             first["max_bad_fraction"])
    excluded = torch.tensor([split.classes.index(c) for c in cfg.exclude_classes if c in split.classes],
                            dtype=torch.int64, device=device)
    metrics = {m.name: ProbabilityMetrics(len(split.classes), device) for m in members}
    ensemble = ProbabilityMetrics(len(split.classes), device)
    for batch in data.eval_batches(stream, cfg.workers):
        if not len(batch.labels):
            continue
        labels = batch.labels.to(device)
        keep = ~torch.isin(labels, excluded)
        probs = [torch.softmax(m.net(m.normalize(batch.images)).double(), dim=1) for m in members]
        for m, p in zip(members, probs):
            metrics[m.name].update(p[keep], labels[keep])
        ensemble.update(combine(probs, cfg.combine)[keep], labels[keep])
    report = {"split": cfg.data.split, "combine": cfg.combine, "checkpoint": cfg.checkpoint,
              "excluded_classes": list(cfg.exclude_classes), "classes": list(split.classes),
              "members": {name: state.all_reduce().compute() for name, state in metrics.items()},
              "ensemble": ensemble.all_reduce().compute()}
    report["reliability"] = ensemble.calibration.diagram()
    return report


def markdown(report: dict) -> str:
    rows = [*report["members"].items(), ("**ensemble**", report["ensemble"])]
    lines = [f"# Evaluation on `{report['split']}` ({report['combine']} of probabilities)", "",
             "| model | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for name, values in rows:
        cells = [f"{values[k]:.4f}" if isinstance(values[k], float) else str(values[k]) for k in SUMMARY_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: EvaluateConfig) -> int:
    env = distributed.detect()
    device = distributed.init(env, cfg.dist_timeout_s)
    try:
        report = evaluate(cfg, env.rank, env.world_size, device)
        if env.rank == 0:
            out = Path(cfg.out or cfg.bag)
            out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(jsonable(report), indent=1, allow_nan=False)  # NaN recall -> "nan"
            write_text_atomic(out / "report.json", text + "\n")
            write_text_atomic(out / "report.md", markdown(report))
            print(markdown(report) + f"\nreport: {out / 'report.json'}, {out / 'report.md'}")
        return 0
    finally:
        distributed.cleanup()


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(raw: DictConfig) -> None:
    try:
        code = run(OmegaConf.to_object(raw))
    except (ConfigError, shardset.ShardSetError) as err:
        log.error("%s", err)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
