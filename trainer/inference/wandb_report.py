"""W&B payloads of a trained bag: evaluate's report as a run of the bag's group; an export as an artifact.

An evaluation is one W&B run in the bag's group (`job_type=evaluate`, named `<bag>/evaluate-<split>`),
with the bag's project, entity and tags as its members recorded them in their config.yaml unless
`logger.*` says otherwise. Its id is derived from what decides its numbers (bag, members, checkpoint,
calibration, TTA, combination, shards, split, exclusions, bins, output folder): running the same
evaluation again resumes its run, another split or setting starts another; workers, batch size and the
W&B settings themselves change no number and no id.

The run carries the summary metrics of every model, the per-class table, the figures (confusion,
reliability, precision-coverage, recall against training count), the confusion counts as W&B's
interactive confusion matrix, the reliability bins, the precision-coverage curves, and a table of
sample predictions with thumbnails: the `SAMPLES_PER_KIND` most confident errors and least confident
correct answers of the ensemble. Thumbnails are the model's input (after crop or letterbox), at most
`THUMB_SIZE` pixels a side; each rank keeps its best candidates only (bounded memory) and rank 0 picks
among them. Nothing is collected with logger.mode=disabled.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from torch import Tensor

from trainer.config import LoggerConfig
from trainer.inference.config import EvaluateConfig
from trainer.inference.evaluate import SUMMARY_KEYS
from trainer.inference.members import member_dirs
from trainer.runtime import distributed
from trainer.runtime.choices import plain
from trainer.tracking import identity
from trainer.tracking.tracker import Tracker, jsonable, metric_key

log = logging.getLogger(__name__)
SAMPLES_PER_KIND = 16   # rows of each kind in the samples table: enough to see a pattern, cheap to keep
THUMB_SIZE = 96         # longer side of a thumbnail in pixels; ~27 KB each, 32 per rank at most
# settings that change no number of the report: left out of the evaluation's W&B id
NOT_IN_ID = ("logger", "workers", "batch_size", "dist_timeout_s", "progress_every_s", "plots")
IMAGES = {"confusion": "confusion", "reliability": "reliability", "coverage": "precision_coverage",
          "recall": "recall_vs_count"}
SAMPLE_COLUMNS = ["kind", "image", "key", "true", "predicted", "confidence", "p_true"]


class Sample(NamedTuple):
    rank: float          # the sort key: lower is more worth showing
    key: str
    true: int
    predicted: int
    confidence: float    # the ensemble's probability of its prediction
    p_true: float        # ... and of the true class
    thumb: np.ndarray    # uint8 [H, W, 3]


def thumbnail(image: Tensor, size: int = THUMB_SIZE) -> np.ndarray:
    """uint8 [3, H, W] -> uint8 [h, w, 3] with max(h, w) <= size (never enlarged)."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    if scale < 1:
        out = torch.nn.functional.interpolate(image[None].float(), size=(max(1, round(h * scale)),
                                              max(1, round(w * scale))), mode="bilinear", antialias=True)
        image = out[0].round().clamp(0, 255).to(torch.uint8)
    return image.permute(1, 2, 0).contiguous().numpy()


class SampleCollector:
    """The ensemble's most confident errors and least confident correct answers, `per_kind` of each."""

    def __init__(self, per_kind: int = SAMPLES_PER_KIND, size: int = THUMB_SIZE) -> None:
        self.per_kind, self.size = per_kind, size
        self.errors: list[Sample] = []
        self.unsure: list[Sample] = []

    def update(self, probs: Tensor, labels: Tensor, images: Tensor, keys: tuple[str, ...]) -> None:
        probs, labels = probs.detach().float().cpu(), labels.cpu()
        confidence, predicted = probs.max(dim=1)
        p_true = probs.gather(1, labels[:, None])[:, 0]
        wrong = predicted != labels
        columns = (keys, labels.tolist(), predicted.tolist(), confidence.tolist(), p_true.tolist())
        self.errors = self._keep(self.errors, wrong, -confidence, images, columns)
        self.unsure = self._keep(self.unsure, ~wrong, confidence, images, columns)

    def _keep(self, kept: list[Sample], mask: Tensor, rank: Tensor, images: Tensor, columns: tuple
              ) -> list[Sample]:
        """`kept` with the batch's better candidates merged in; thumbnails only for those that enter."""
        index = torch.nonzero(mask).flatten()
        index = index[torch.argsort(rank[index], stable=True)][:self.per_kind].tolist()
        worst = (kept[-1].rank, kept[-1].key) if len(kept) >= self.per_kind else None
        keys, true, predicted, confidence, p_true = columns
        new = [Sample(float(rank[i]), keys[i], true[i], predicted[i], confidence[i], p_true[i],
                      thumbnail(images[i], self.size))
               for i in index if worst is None or (float(rank[i]), keys[i]) < worst]
        return sorted(kept + new, key=lambda s: (s.rank, s.key))[:self.per_kind] if new else kept

    def merge_ranks(self) -> None:
        """Every rank's candidates to rank 0, which keeps the best; a collective: call it on all ranks."""
        parts = distributed.gather((self.errors, self.unsure))
        if parts is None:  # not rank 0: nothing to log here
            self.errors, self.unsure = [], []
            return
        order = lambda s: (s.rank, s.key)  # noqa: E731
        self.errors = sorted([s for e, _ in parts for s in e], key=order)[:self.per_kind]
        self.unsure = sorted([s for _, u in parts for s in u], key=order)[:self.per_kind]

    def rows(self, wandb: Any, classes: list[str]) -> list[list]:
        kinds = [("confident error", self.errors), ("unsure correct", self.unsure)]
        return [[kind, wandb.Image(s.thumb, caption=f"{classes[s.true]} -> {classes[s.predicted]}"), s.key,
                 classes[s.true], classes[s.predicted], s.confidence, s.p_true]
                for kind, samples in kinds for s in samples]


# ---------------------------------------------------------------------------------------- identity


def recorded_loggers(bag: Path, members: list[str]) -> list[dict]:
    """`logger` and `model` of each member's config.yaml: what its training told W&B."""
    found = []
    for name, run_dir in member_dirs(bag, members):
        path = run_dir / "config.yaml"
        try:
            recorded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            log.warning("%s: unreadable (%s); W&B uses the defaults for member %s's group and tags", path,
                        err, name)
            continue
        model = (recorded.get("model") or {}).get("name")
        found.append({"logger": recorded.get("logger") or {}, "model": model})
    return found


def bag_identity(bag: Path, members: list[str], logger: LoggerConfig, name: str, job_type: str
                 ) -> identity.Identity:
    """A run about a bag: its project, entity, group and tags as its members recorded them, with the
    models as tags, unless `logger.*` says otherwise; `name` and `job_type` unless logger sets them."""
    recorded = recorded_loggers(bag, members)
    first = recorded[0]["logger"] if recorded else {}
    return identity.Identity(
        project=logger.project or first.get("project") or identity.DEFAULT_PROJECT,
        entity=logger.entity or first.get("entity"),
        group=logger.group or first.get("group") or bag.resolve().name,
        name=logger.name or name,
        job_type=logger.job_type or job_type,
        tags=identity.tags(*(r["logger"].get("tags") for r in recorded), *(r["model"] for r in recorded),
                           logger.tags))


def evaluation_identity(cfg: EvaluateConfig) -> identity.Identity:
    bag = Path(cfg.bag)
    views = "" if cfg.tta == "none" else f"-tta-{cfg.tta}"
    name = f"{bag.resolve().name}/evaluate-{cfg.data.split}{views}"
    return bag_identity(bag, cfg.members, cfg.logger, name, "evaluate")


def evaluation_id(cfg: EvaluateConfig) -> str:
    """The same for the same evaluation (bag, split, output folder, settings), another for any other."""
    settings = {k: v for k, v in plain(cfg).items() if k not in NOT_IN_ID}
    settings["bag"] = str(Path(cfg.bag).expanduser().resolve())
    settings["out"] = str(Path(cfg.out or cfg.bag).expanduser().resolve())
    settings["data"] = {**settings["data"], "shards": str(Path(cfg.data.shards).expanduser().resolve())}
    settings["data"].pop("check", None)  # how hard the shards were checked changes no number
    return identity.derived_id("evaluate", settings)


# ---------------------------------------------------------------------------------------- evaluate


def summary_scalars(report: dict) -> dict[str, object]:
    models = [("ensemble", report["ensemble"]), *report["members"].items()]
    return {f"{model}/{k}": values[k] for model, values in models for k in SUMMARY_KEYS}


def report_payload(wandb: Any, report: dict, files: dict[str, Path], samples: SampleCollector | None
                   ) -> dict[str, object]:
    """Everything of the report W&B can show: figures, tables, interactive charts, sample predictions."""
    models = [*report["members"].items(), ("ensemble", report["ensemble"])]
    per_class = report["per_class"]
    payload: dict[str, object] = {
        "summary": wandb.Table(columns=["model", *SUMMARY_KEYS],
                               data=[[m, *(_cell(v[k]) for k in SUMMARY_KEYS)] for m, v in models]),
        "per_class": wandb.Table(columns=list(per_class[0]),
                                 data=[[_cell(v) for v in row.values()] for row in per_class]),
        **{IMAGES[k]: wandb.Image(str(path)) for k, path in files.items() if k in IMAGES},
    }
    counts = report["confusion"]
    cells = [[t, p, n] for t, row in zip(counts["classes"], counts["counts"])
             for p, n in zip(counts["classes"], row)]
    payload["confusion_matrix"] = wandb.plot_table(
        "wandb/confusion_matrix/v1", wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells),
        {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
        {"title": f"Ensemble confusion on {report['split']}"})
    bins = [[m, b["low"], b["high"], b["count"], _cell(b["confidence"]), _cell(b["accuracy"])]
            for m, rows in report["reliability"].items() for b in rows]
    payload["reliability_bins"] = wandb.Table(
        columns=["model", "low", "high", "count", "confidence", "accuracy"], data=bins)
    curve = [[m, c, p] for m, values in report["acceptance"]["curves"].items()
             for c, p in zip(values["coverage"], values["precision"])]
    if curve:
        payload["precision_coverage_curve"] = wandb.plot.line(
            wandb.Table(columns=["model", "coverage", "precision"], data=curve), "coverage", "precision",
            stroke="model", title="Precision against coverage (automatic acceptance)")
    if samples is not None:
        payload["samples"] = wandb.Table(columns=SAMPLE_COLUMNS, data=samples.rows(wandb, report["classes"]))
    return payload


def _cell(value: object) -> object:
    """A table cell: NaN (a class without samples) as None, since a W&B column holds one type."""
    out = jsonable(value)
    return None if out in ("nan", "inf", "-inf") else out


def log_report(cfg: EvaluateConfig, report: dict, files: dict[str, Path], out: Path,
               samples: SampleCollector | None) -> None:
    """The evaluation's own W&B run (main rank only; `samples` already merged across ranks)."""
    who = evaluation_identity(cfg)
    with Tracker(out, is_main=True, mode=str(cfg.logger.mode), config={"evaluate": jsonable(plain(cfg))},
                 run_id=evaluation_id(cfg), keep_id=False, **who.kwargs()) as tracker:
        tracker.summary(summary_scalars(report))
        tracker.log_wandb(lambda wandb: report_payload(wandb, report, files, samples), step=0)


# ---------------------------------------------------------------------------------------- export


def log_export(bag: Path, out: Path, metas: list[dict], logger: LoggerConfig) -> None:
    """Every file of the export folder `out` as one W&B artifact (type `model`) of an `export` run in the
    bag's group. The run's own files go to the bag folder, not into the export."""
    if logger.mode == "disabled":
        return
    bag = Path(bag)
    bag_name = bag.resolve().name
    who = bag_identity(bag, [m["name"] for m in metas], logger, f"{bag_name}/export", "export")
    files = sorted(p for p in Path(out).iterdir() if p.is_file() and not p.name.startswith("."))
    metadata = {"classes": metas[0]["classes"] if metas else [], "source": str(Path(bag).resolve()),
                "members": [{"name": m["name"], "model": m["model"], "step": m["step"]} for m in metas]}
    run_id = identity.derived_id("export", {"bag": metadata["source"], "out": str(Path(out).resolve())})
    with Tracker(bag, is_main=True, mode=str(logger.mode), config={"export": metadata}, run_id=run_id,
                 keep_id=False, **who.kwargs()) as tracker:
        tracker.log_artifact(f"{metric_key(bag_name)}-export", "model", files, metadata)
