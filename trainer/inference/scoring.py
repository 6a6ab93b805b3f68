"""What a bag says about a batch: each member's and the ensemble's probabilities, raw and calibrated.

One forward pass per member serves both: temperature scaling divides the logits of each test-time
view before the softmax (`members.softmax_views`), and the ensemble's own temperature rescales the
combined probabilities (`softmax(log p / T)`). The temperatures and acceptance thresholds come from the
bag's `calibration.json` (written by `taxotrain-calibrate`, or by `taxotrain-bag` after training);
`calibration=none` uses raw softmax. Calibration fitted for another set of members, TTA or
combination is used for what still fits, with a warning naming what differs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from trainer.inference.calibration import BagCalibration, Thresholds
from trainer.inference.ensemble import EPS, combine
from trainer.inference.members import Member, softmax_views, view_logits
from trainer.runtime.exits import ConfigError

log = logging.getLogger(__name__)
CALIBRATION_FILE = "calibration.json"
ENSEMBLE = "ensemble"


def calibration_path(bag: str | Path) -> Path:
    return Path(bag) / CALIBRATION_FILE


def rescale(probs: Tensor, temperature: float) -> Tensor:
    """softmax(log p / T): the ensemble's temperature, applied to its combined probabilities."""
    if temperature == 1.0:
        return probs
    return torch.softmax(probs.clamp_min(EPS).log() / temperature, dim=1)


@dataclass
class Scores:
    members: list[Tensor]       # float64 [B, C] per member, calibrated when a calibration is used
    ensemble: Tensor
    raw_members: list[Tensor]   # the same before temperature scaling
    raw_ensemble: Tensor


class Scorer:
    """The members of a bag with their calibration (or none); call it on a uint8 image batch."""

    def __init__(self, members: list[Member], tta: str, combine_mode: str,
                 calibration: BagCalibration | None) -> None:
        self.members, self.tta, self.combine_mode = members, tta, combine_mode
        self.calibration = calibration
        self.temperatures = [calibration.members[m.name] if calibration else 1.0 for m in members]
        whole = calibration is not None and sorted(calibration.members) == sorted(m.name for m in members)
        # the ensemble's temperature and thresholds were fitted on the whole bag's combination only
        self.ensemble_temperature = calibration.ensemble if whole and calibration else 1.0
        self.ensemble_fitted = whole

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def thresholds(self, model: str) -> Thresholds | None:
        """The acceptance thresholds of `model` (a member name or "ensemble"), None when not fitted."""
        if self.calibration is None or (model == ENSEMBLE and not self.ensemble_fitted):
            return None
        return self.calibration.thresholds.get(model)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Scores:
        logits = [view_logits(m, images, self.tta) for m in self.members]
        raw = [softmax_views(z) for z in logits]
        if not self.calibrated:
            ensemble = combine(raw, self.combine_mode)
            return Scores(raw, ensemble, raw, ensemble)
        cal = [softmax_views(z, t) for z, t in zip(logits, self.temperatures)]
        ensemble = rescale(combine(cal, self.combine_mode), self.ensemble_temperature)
        return Scores(cal, ensemble, raw, combine(raw, self.combine_mode))


def load_calibration(bag: str | Path, use: str, members: list[Member], tta: str, combine_mode: str
                     ) -> BagCalibration | None:
    """The bag's calibration for these members, None with `use=none` or when the bag has none (warned)."""
    if use == "none":
        return None
    path = calibration_path(bag)
    if not path.is_file():
        log.warning("%s: no %s: probabilities are raw softmax and every prediction goes to review; "
                    "fit one with `taxotrain-calibrate bag=%s data.shards=DIR`", bag, CALIBRATION_FILE, bag)
        return None
    cal = BagCalibration.load(path)
    missing = [m.name for m in members if m.name not in cal.members]
    if missing:
        raise ConfigError(f"{path}: no temperature for member(s) {missing}; calibrate the bag again "
                          f"(taxotrain-calibrate) or use calibration=none")
    n_classes = len(members[0].classes)
    wrong = [name for name, t in cal.thresholds.items() if len(t.per_class) != n_classes]
    if wrong:
        raise ConfigError(f"{path}: thresholds of {wrong} are for another number of classes than the "
                          f"bag's {n_classes}; calibrate the bag again")
    differs = [f"{k} {old!r} (now {new!r})" for k, old, new in
               (("tta", cal.tta, tta), ("combine", cal.combine, combine_mode)) if old != new]
    if differs:
        log.warning("%s was fitted with %s: its temperatures and thresholds may fit less well",
                    path, ", ".join(differs))
    if sorted(cal.members) != sorted(m.name for m in members):
        log.warning("%s was fitted on members %s, these are %s: member temperatures apply, the ensemble's "
                    "temperature and thresholds do not (every prediction goes to review)", path,
                    sorted(cal.members), [m.name for m in members])
    return cal
