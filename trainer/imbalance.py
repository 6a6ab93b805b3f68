"""Rare classes in the loss: per-class weights and logit adjustment, from the training split's counts.

A long-tailed training split teaches a classifier that the common classes are the safe answer. Two
settings correct the loss for it (both off by default, which leaves the plain cross-entropy):

- `optim.class_weight`: each sample's loss is multiplied by its class's weight, `balanced`
  n / (C n_c) as in scikit-learn, or `sqrt`, the square root of that, a milder correction.
- `optim.logit_adjust_tau`: the loss variant of logit adjustment (Menon et al. 2021, "Long-tail learning
  via logit adjustment"): training computes the cross-entropy of logits + tau log(prior_c). The network
  then learns logits from which the prior has been taken out, so the unchanged logits at inference are
  the balanced ones; evaluate, predict and calibration need nothing new.

Both read the counts of the full train split (`_info.json` `splits.<train>.class_counts`). A bag member
trains on a Poisson(1) bootstrap resample of that split, whose expected counts are these: the full
split's counts are what every member shares, so they are used, not each resample's. `data.fraction`
keeps about that fraction of every class, which leaves the proportions as they are.

Neither touches the data stream. A class-balanced sampler is absent on purpose: the loader streams
shards with the same number of steps on every rank and resumes bitwise through a seeded shuffle buffer,
and re-weighting the samples would need random access or per-sample rejection, breaking one or the
other. Balanced loss weights give the expected gradient of a class-balanced sampler, and logit
adjustment aims at the same balanced error, both without touching the stream.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from trainer.runtime.exits import ConfigError


def class_weights(counts: Sequence[int], mode: str) -> torch.Tensor | None:
    """Per-class loss weights (float32) for `mode` none | balanced | sqrt; None for none.

    balanced: n / (C n_c), C the classes with samples, so the mean weight over the training samples is
    exactly 1. sqrt: the square root of that, rescaled to the same mean of 1. The mean matters because
    the loss is a plain mean over the batch (`AdjustedLoss`): with a mean weight of 1 the loss, and so the
    lr that the linear scaling rule chose, keeps the scale of the unweighted loss. A class without
    training samples gets 0 (it never occurs as a label; the Trainer warns about it).
    """
    if mode == "none":
        return None
    if mode not in ("balanced", "sqrt"):
        raise ConfigError(f"optim.class_weight must be none, balanced or sqrt, got {mode!r}")
    n_c = torch.tensor(counts, dtype=torch.float64)
    seen = n_c > 0
    n, present = float(n_c.sum()), int(seen.sum())
    weights = torch.where(seen, n / (present * n_c.clamp(min=1)), 0.0)
    if mode == "sqrt":
        weights = weights.sqrt()
        weights = weights * n / float((n_c * weights).sum())  # mean over samples back to 1
    return weights.float()


def log_prior(counts: Sequence[int]) -> torch.Tensor:
    """log(n_c / n) per class (float32). A class without samples is counted as 1: log 0 = -inf would
    give it a softmax probability of 0 in the loss, hence no gradient, and its logit would stay where
    initialisation left it, free to win at inference; as 1 it is pushed down like the rarest class."""
    n_c = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
    return (n_c / n_c.sum()).log().float()


class AdjustedLoss(nn.Module):
    """Cross-entropy of logits + `shift` (tau log prior), each sample's loss times its class's weight,
    averaged over the batch.

    The plain mean, not PyTorch's weighted mean (sum w l / sum w): dividing by the batch's own weights
    would shrink every other sample's gradient in a batch that holds one rare sample, while the plain
    mean is an unbiased estimate of the weighted expected loss."""

    def __init__(self, weights: torch.Tensor | None, shift: torch.Tensor | None,
                 label_smoothing: float) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weights", weights)  # buffers: .to(device) moves them with the module
        self.register_buffer("shift", shift)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            logits = logits + self.shift
        loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)
        if self.weights is not None:
            loss = loss * self.weights[labels]
        return loss.mean()


def criterion(counts: Sequence[int] | None, class_weight: str, tau: float, label_smoothing: float,
              source: str) -> nn.Module:
    """The training loss. With no weighting and tau 0 it is exactly the cross-entropy used before these
    settings existed (same module, same reduction), so such runs compute bit for bit what they did.
    `counts` are the train split's (None where `source`, which names the set, records none)."""
    if class_weight == "none" and tau == 0:
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if counts is None:
        asked = (f"optim.class_weight={class_weight}" if class_weight != "none"
                 else f"optim.logit_adjust_tau={tau}")
        raise ConfigError(f"{asked} needs the training split's class counts (_info.json "
                          f"splits.<train>.class_counts, written by shards.build): {source} has none")
    shift = tau * log_prior(counts) if tau else None
    return AdjustedLoss(class_weights(counts, class_weight), shift, label_smoothing)


def unseen_warning(classes: Sequence[str], counts: Sequence[int], class_weight: str, tau: float
                   ) -> str | None:
    """The warning for classes without training samples when a setting here uses the counts."""
    unseen = [c for c, n in zip(classes, counts) if n == 0]
    if not unseen or (class_weight == "none" and tau == 0):
        return None
    return (f"{len(unseen)} class(es) have no training samples: {', '.join(unseen)}; optim.class_weight "
            f"gives them weight 0 and logit adjustment counts them as 1 sample")


def missing_validation_warning(classes: Sequence[str], train: Sequence[int] | None, val: Sequence[int],
                               split: str) -> str | None:
    """One line naming the classes with no sample in validation `split`, with their training counts:
    their recall is never measured, so early stopping and calibration ignore them."""
    missing = [(c, "?" if train is None else train[i]) for i, c in enumerate(classes) if val[i] == 0]
    if not missing:
        return None
    listing = ", ".join(f"{c!r} ({n} train)" for c, n in missing)
    return (f"{len(missing)} of {len(classes)} class(es) have 0 samples in the validation split {split!r}, "
            f"so their accuracy is never measured: {listing}")
