"""Classification metrics kept as sums, so per-rank states combine exactly by one all_reduce(SUM).

Ranking conventions (deterministic on every device, unlike `torch.topk` whose tie order is unspecified):
- top-k: classes are ordered by score, ties broken by lower class index (so top-1 equals `argmax`);
  a hit is the true class within the first k, with k clipped to the number of classes.
- MRR: rank = the true class's 1-based place in that same order, so MRR agrees with top-k (a
  top-1 hit is exactly reciprocal rank 1) and constant logits cannot score well.
- A sample with a NaN logit has no meaningful ranking: it counts as a miss everywhere (reciprocal rank 0)
  and its NaN still reaches `loss`, which is where a diverged model should show up.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

TOPK = 5


class MetricState:
    """Running sums over samples; `compute()` turns them into rates only at the end."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {num_classes}")
        self.num_classes = num_classes
        self.k = min(TOPK, num_classes)
        # float64 sums: float32 loses whole units past 2**24 samples.
        self.n = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.top1 = torch.zeros((), dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.rr_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.support = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.correct_k = torch.zeros(num_classes, dtype=torch.int64, device=device)  # per-class top-k hits

    def _tensors(self) -> list[Tensor]:
        return [self.n, self.loss_sum, self.top1, self.top5, self.rr_sum, self.support, self.correct,
                self.correct_k]

    def _check_batch(self, logits: Tensor, targets: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be [N, {self.num_classes}], got {list(logits.shape)}")
        if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
            raise ValueError(f"targets must be [{logits.shape[0]}], got {list(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
        # One host sync per batch; an out-of-range label would otherwise corrupt the counts silently
        # (bincount) or abort the CUDA context (gather).
        if targets.numel() and bool(((targets < 0) | (targets >= self.num_classes)).any()):
            raise ValueError(f"targets must lie in [0, {self.num_classes})")

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor, loss_sum: Tensor | float | None = None,
               check: bool = True) -> None:
        """Add one batch. `loss_sum` is the batch's summed (not mean) loss; default: cross-entropy.

        `check=False` skips the label range check and its host sync, for the training loop whose
        labels the loader has already validated.
        """
        if check:
            self._check_batch(logits, targets)
        logits, targets = logits.detach(), targets.to(device=logits.device, dtype=torch.int64)
        if loss_sum is None:
            loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        elif torch.as_tensor(loss_sum).numel() != 1:
            raise ValueError("loss_sum must be a scalar: the batch's summed loss, not per-sample losses")
        valid = ~logits.isnan().any(dim=1)
        true = logits.gather(1, targets[:, None])
        higher = (logits > true).sum(dim=1)
        cls = torch.arange(self.num_classes, device=logits.device)
        tied_before = ((logits == true) & (cls[None, :] < targets[:, None])).sum(dim=1)
        position = higher + tied_before  # 0-based place in the (score desc, index asc) order
        hit1 = (position == 0) & valid
        rr = torch.where(valid, 1.0 / (position + 1).double(), 0.0)
        self._add(targets, hit1, ((position < self.k) & valid), rr, loss_sum)

    def _add(self, targets: Tensor, hit1: Tensor, hitk: Tensor, rr: Tensor, loss_sum: Tensor | float) -> None:
        dev = self.n.device
        self.n += targets.numel()
        self.loss_sum += torch.as_tensor(loss_sum, dtype=torch.float64).to(dev)
        self.top1 += hit1.sum().to(dev)
        self.top5 += hitk.sum().to(dev)
        self.rr_sum += rr.sum().to(dev)
        self.support += torch.bincount(targets, minlength=self.num_classes).to(dev)
        self.correct += torch.bincount(targets[hit1], minlength=self.num_classes).to(dev)
        self.correct_k += torch.bincount(targets[hitk], minlength=self.num_classes).to(dev)

    def merge(self, other: MetricState) -> MetricState:
        """Add another state's sums into this one (e.g. states from separate eval passes)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class state into {self.num_classes}-class")
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine += theirs.to(mine.device)
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> MetricState:
        """Sum every tensor over the process group; a no-op without an initialised process group.

        All sums travel in one float64 vector (one collective, not eight); counts stay exact up to 2**53.
        With NCCL the state must live on this rank's CUDA device.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        tensors = self._tensors()
        flat = torch.cat([t.reshape(-1).double() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(chunk.view_as(t))  # int counts are exact in float64, so the cast back is lossless
        return self

    def compute(self) -> dict[str, float | int | list[float]]:
        """Rates from the sums. An empty state raises: evaluating nothing means a broken loader, and
        NaNs would pass silently into the logs."""
        n = int(self.n)
        if n == 0:
            raise ValueError("MetricState.compute() on an empty state: no samples were added")
        support = self.support.double()
        recall = torch.where(support > 0, self.correct.double() / support.clamp(min=1), math.nan)
        recall_k = torch.where(support > 0, self.correct_k.double() / support.clamp(min=1), math.nan)
        return {
            "loss": float(self.loss_sum) / n,
            "top1": int(self.top1) / n,
            "top5": int(self.top5) / n,
            "mrr": float(self.rr_sum) / n,
            "balanced_acc": float(recall[support > 0].mean()),
            "macro_top5": float(recall_k[support > 0].mean()),  # top-k recall averaged over classes
            "per_class_recall": recall.tolist(),
            "per_class_top5": recall_k.tolist(),
            "n": n,
        }
