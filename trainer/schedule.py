"""Learning-rate scaling and per-iteration schedules (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

A "step" here is one optimizer step: call `scheduler.step()` once after every `optimizer.step()`, so with
gradient accumulation there are `batches / accum_steps` steps per epoch. Epoch-based settings (warmup of
5 epochs, decay at epochs 30/60/80) are converted to steps by the caller.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

KINDS = ("cosine", "step")


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def scaled_lr(
    base_lr: float, per_rank_batch: int, world_size: int, accum_steps: int, base_batch: int = 256
) -> tuple[float, int]:
    """(lr, global_batch) under the linear scaling rule: lr grows in proportion to the global batch."""
    _require_positive(
        base_lr=base_lr, per_rank_batch=per_rank_batch, world_size=world_size,
        accum_steps=accum_steps, base_batch=base_batch,
    )
    global_batch = per_rank_batch * world_size * accum_steps
    return base_lr * global_batch / base_batch, global_batch


def goyal_start_factor(global_batch: int, base_batch: int = 256) -> float:
    """Warmup start factor that begins at the unscaled base lr, as in Goyal et al.

    Capped at 1.0: a global batch below `base_batch` scales the lr down, and "warming up" would then
    mean starting above the target lr.
    """
    _require_positive(global_batch=global_batch, base_batch=base_batch)
    return min(1.0, base_batch / global_batch)


def _warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    # Linear in the step so that step 0 is exactly start_factor and step warmup_steps is exactly 1.0.
    return start_factor + (1.0 - start_factor) * step / warmup_steps


# The multipliers are plain dataclasses rather than lambdas: LambdaLR checkpoints a callable object's
# __dict__ (here only ints/floats/tuples, so `torch.load(weights_only=True)` accepts it) and skips lambdas.
@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup to 1.0, then cosine decay to `min_factor` at `total_steps` (held there after)."""

    total_steps: int
    warmup_steps: int
    start_factor: float
    min_factor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup_factor(step, self.warmup_steps, self.start_factor)
        # max(1, ...) keeps warmup_steps == total_steps well defined: decay is then immediate.
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupStep:
    """Linear warmup to 1.0, then multiply by `gamma` at each milestone step (absolute, from step 0)."""

    warmup_steps: int
    start_factor: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup_factor(step, self.warmup_steps, self.start_factor)
        passed = sum(1 for m in self.milestones if step >= m)
        return self.gamma**passed


def _check_common(total_steps: int, warmup_steps: int, warmup_start_factor: float) -> None:
    _require_positive(total_steps=total_steps)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= warmup_start_factor <= 1.0:
        raise ValueError(f"warmup_start_factor must be in [0, 1], got {warmup_start_factor}")


def _check_milestones(milestones: Sequence[int], warmup_steps: int, total_steps: int) -> tuple[int, ...]:
    ms = tuple(int(m) for m in milestones)
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError(f"milestones must be strictly increasing, got {list(ms)}")
    # A milestone inside warmup would be silently overridden by the warmup ramp.
    if ms and not (warmup_steps <= ms[0] and ms[-1] <= total_steps):
        raise ValueError(f"milestones must lie in [warmup_steps={warmup_steps}, total_steps={total_steps}], "
                         f"got {list(ms)}")
    return ms


def make_multiplier(
    kind: str,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float,
    min_factor: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> WarmupCosine | WarmupStep:
    """The validated lr multiplier for `kind`; options of the other kind are rejected, not ignored,
    because setting them signals an expected decay that would never happen."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {KINDS}")
    _check_common(total_steps, warmup_steps, warmup_start_factor)
    if kind == "cosine":
        if milestones:
            raise ValueError("milestones only apply to kind='step', not 'cosine'")
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor}")
        return WarmupCosine(total_steps, warmup_steps, float(warmup_start_factor), float(min_factor))
    if min_factor != 0.0:
        raise ValueError("min_factor only applies to kind='cosine', not 'step'")
    _require_positive(gamma=gamma)
    ms = _check_milestones(milestones, warmup_steps, total_steps)
    return WarmupStep(warmup_steps, float(warmup_start_factor), ms, float(gamma))


def build_scheduler(
    optimizer: Optimizer,
    kind: str,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float,
    min_factor: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> LambdaLR:
    """LambdaLR over the optimizer's current lrs (set them to the scaled lr first).

    On resume, restore it with `resume`, not `load_state_dict` (which would overwrite the multiplier's
    fields with the checkpoint's, so the old total would silently win over a changed config).
    """
    fn = make_multiplier(kind, total_steps, warmup_steps, warmup_start_factor, min_factor, milestones, gamma)
    return LambdaLR(optimizer, fn)


Multiplier = WarmupCosine | WarmupStep


def resume(scheduler: LambdaLR, saved: dict) -> tuple[bool, Multiplier | None]:
    """Continue `saved` (a LambdaLR state_dict) from its step with the multiplier `scheduler` was built
    with (the current config). Returns (changed, the checkpoint's multiplier or None if it cannot be
    read back, e.g. written by another version): whether the lr now differs from the saved schedule's.

    The step and base lrs come from the checkpoint; the optimizer's lrs (loaded with the optimizer, and
    used by the next optimizer step) and `get_last_lr()` are set from the current multiplier at that
    step: `base * fn(step)`, the expression LambdaLR itself uses, so an unchanged schedule resumes
    bitwise. `None` entries in `lr_lambdas` are LambdaLR's own "nothing saved for this one" and keep the
    current multiplier.
    """
    current: Multiplier = scheduler.lr_lambdas[0]
    held = saved["lr_lambdas"][0]
    step = saved["last_epoch"]
    lrs = [base * current(step) for base in saved["base_lrs"]]
    scheduler.load_state_dict({**saved, "lr_lambdas": [None] * len(saved["lr_lambdas"]), "_last_lr": lrs})
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    old = replace(current, **held) if isinstance(held, dict) and set(held) == set(vars(current)) else None
    return old != current, old


def describe_change(old: Multiplier | None, new: Multiplier, step: int, peak_lr: float) -> str:
    """How the lr goes on after `step` completed steps under `new` rather than `old`, in one sentence."""
    nxt = f"step {step + 1}, the first after the resume, trains at lr {peak_lr * new(step):.6g}"
    if old is None:  # a checkpoint whose multiplier cannot be read back: nothing to compare with
        return f"the lr schedule is rebuilt from the current config ({new}): {nxt}"
    fields = ", ".join(f"{k} {v} -> {getattr(new, k)}" for k, v in vars(old).items() if getattr(new, k) != v)
    ends = (f": cosine now ends at step {new.total_steps} instead of {old.total_steps}"
            if isinstance(new, WarmupCosine) and old.total_steps != new.total_steps else "")
    return (f"the lr schedule is rebuilt for the new length ({fields}){ends}; {nxt} "
            f"(the old schedule: {peak_lr * old(step):.6g})")


def describe(
    base_lr: float,
    per_rank_batch: int,
    world_size: int,
    accum_steps: int,
    total_steps: int,
    warmup_steps: int,
    base_batch: int = 256,
) -> dict[str, float | int]:
    """Derived values, logged once at start so a run's effective recipe is visible without arithmetic."""
    lr, global_batch = scaled_lr(base_lr, per_rank_batch, world_size, accum_steps, base_batch)
    _check_common(total_steps, warmup_steps, 1.0)
    return {
        "base_lr": base_lr,
        "base_batch": base_batch,
        "per_rank_batch": per_rank_batch,
        "world_size": world_size,
        "accum_steps": accum_steps,
        "global_batch": global_batch,
        "lr": lr,
        "warmup_start_factor": goyal_start_factor(global_batch, base_batch),
        "warmup_steps": warmup_steps,
        "total_steps": total_steps,
    }
