"""LR scaling/schedule against closed-form values; metrics against hand-computed values and a real
2-process gloo all_reduce."""
from __future__ import annotations

import math
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.metrics import MetricState
from trainer.schedule import (
    WarmupCosine,
    build_scheduler,
    describe,
    goyal_start_factor,
    make_multiplier,
    scaled_lr,
)

# ---------------------------------------------------------------- linear scaling rule


@pytest.mark.parametrize(
    "per_rank, world, accum, lr, global_batch",
    [
        (32, 8, 1, 0.1, 256),  # the reference batch: lr unchanged
        (32, 256, 1, 3.2, 8192),  # Goyal et al.: 8k minibatch -> lr 0.1 * 32
        (32, 64, 4, 3.2, 8192),  # accumulation counts towards the global batch like ranks do
        (64, 1, 1, 0.025, 64),  # smaller than the reference batch scales down
    ],
)
def test_scaled_lr_examples(per_rank: int, world: int, accum: int, lr: float, global_batch: int) -> None:
    got_lr, got_batch = scaled_lr(0.1, per_rank, world, accum)
    assert got_batch == global_batch
    assert got_lr == pytest.approx(lr, rel=1e-12)


def test_scaled_lr_custom_base_batch() -> None:
    assert scaled_lr(0.2, 128, 2, 1, base_batch=512) == (pytest.approx(0.1), 256)


@pytest.mark.parametrize("arg", ["base_lr", "per_rank_batch", "world_size", "accum_steps", "base_batch"])
@pytest.mark.parametrize("bad", [0, -1])
def test_scaled_lr_rejects_nonpositive(arg: str, bad: int) -> None:
    kw = dict(base_lr=0.1, per_rank_batch=32, world_size=8, accum_steps=1, base_batch=256)
    kw[arg] = bad
    with pytest.raises(ValueError, match=arg):
        scaled_lr(**kw)


def test_goyal_start_factor_and_describe() -> None:
    assert goyal_start_factor(8192) == 1 / 32
    assert goyal_start_factor(64) == 1.0  # capped: never "warm up" from above the target
    d = describe(0.1, 32, 64, 4, total_steps=90 * 156, warmup_steps=5 * 156)
    assert d["global_batch"] == 8192 and d["lr"] == pytest.approx(3.2)
    assert d["warmup_start_factor"] == 1 / 32
    assert (d["warmup_steps"], d["total_steps"]) == (780, 14040)


# ---------------------------------------------------------------- schedules, closed form

# global batch 1024 at base 256: warmup starts at 0.25 (the unscaled lr) and reaches 1.0 at step 100.
COS = dict(kind="cosine", total_steps=1000, warmup_steps=100, warmup_start_factor=0.25)


@pytest.mark.parametrize(
    "step, factor",
    [
        (0, 0.25),  # warmup start = base_batch / global_batch
        (50, 0.625),  # 0.25 + 0.75 * 50/100
        (99, 0.9925),  # 0.25 + 0.75 * 99/100
        (100, 1.0),  # warmup end, cosine start
        (325, 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter into the decay
        (550, 0.5),  # cosine midpoint: (550-100)/900 = 1/2
        (1000, 0.0),  # end
        (1500, 0.0),  # held at the floor past the end
    ],
)
def test_cosine_closed_form(step: int, factor: float) -> None:
    assert make_multiplier(**COS)(step) == pytest.approx(factor, abs=1e-12)


def test_cosine_min_factor() -> None:
    fn = make_multiplier(**COS, min_factor=0.1)
    assert fn(100) == pytest.approx(1.0)
    assert fn(550) == pytest.approx(0.55)  # 0.1 + 0.9 * 0.5
    assert fn(1000) == pytest.approx(0.1)


def test_no_warmup_and_warmup_to_the_end() -> None:
    assert make_multiplier("cosine", 10, 0, 0.5)(0) == 1.0
    fn = make_multiplier("cosine", 10, 10, 0.5)
    assert [fn(s) for s in (0, 5, 10)] == pytest.approx([0.5, 0.75, 1.0])


# 10 steps/epoch: warmup 5 epochs, decay x0.1 at epochs 30/60/80, 90 epochs.
STEP = dict(
    kind="step", total_steps=900, warmup_steps=50, warmup_start_factor=0.1, milestones=[300, 600, 800]
)


@pytest.mark.parametrize(
    "step, factor",
    [
        (0, 0.1),
        (25, 0.55),  # 0.1 + 0.9 * 25/50
        (50, 1.0),
        (299, 1.0),
        (300, 0.1),
        (599, 0.1),
        (600, 0.01),
        (799, 0.01),
        (800, 0.001),
        (899, 0.001),
    ],
)
def test_step_closed_form(step: int, factor: float) -> None:
    assert make_multiplier(**STEP)(step) == pytest.approx(factor, rel=1e-12)


def test_step_gamma() -> None:
    fn = make_multiplier(**{**STEP, "gamma": 0.5})
    assert [fn(s) for s in (299, 300, 600, 800)] == pytest.approx([1.0, 0.5, 0.25, 0.125])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kind": "linear"}, "linear"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 1001}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_start_factor": 1.5}, "warmup_start_factor"),
        ({"min_factor": -0.1}, "min_factor"),
        ({"milestones": [500]}, "milestones"),  # not a cosine option
    ],
)
def test_cosine_rejects(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_multiplier(**{**COS, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"milestones": [600, 300]}, "increasing"),
        ({"milestones": [20, 300]}, "milestones"),  # inside warmup
        ({"milestones": [300, 901]}, "milestones"),  # past the end
        ({"gamma": 0}, "gamma"),
        ({"min_factor": 0.1}, "min_factor"),  # not a step option
    ],
)
def test_step_rejects(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_multiplier(**{**STEP, **kw})


def test_build_scheduler_unknown_kind_names_it() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="'poly'"):
        build_scheduler(opt, "poly", 10, 1, 0.5)


# ---------------------------------------------------------------- schedules through SGD + LambdaLR

PEAK_LR = 0.4  # scaled_lr(0.1, 128, 8, 1)


def _sgd(lr: float = PEAK_LR) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=lr, momentum=0.9, weight_decay=1e-4)


def _run(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The lr each optimizer step used, in the training-loop order (opt.step, then sched.step)."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    "cfg, literal",
    [
        (COS, {0: 0.1, 50: 0.25, 100: 0.4, 550: 0.2, 999: 0.4 * 0.5 * (1 + math.cos(math.pi * 899 / 900))}),
        (STEP, {0: 0.04, 50: 0.4, 299: 0.4, 300: 0.04, 600: 0.004, 899: 0.0004}),
    ],
    ids=["cosine", "step"],
)
def test_real_sgd_follows_closed_form(cfg: dict, literal: dict[int, float]) -> None:
    opt = _sgd()
    fn = make_multiplier(**cfg)
    lrs = _run(opt, build_scheduler(opt, **cfg), cfg["total_steps"])
    assert lrs == pytest.approx([PEAK_LR * fn(s) for s in range(cfg["total_steps"])], rel=1e-9, abs=1e-15)
    for step, lr in literal.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-9), step


@pytest.mark.parametrize("cfg", [COS, STEP], ids=["cosine", "step"])
def test_scheduler_state_round_trip_weights_only(cfg: dict, tmp_path: Path) -> None:
    total, cut = cfg["total_steps"], 437
    ref_opt = _sgd()
    reference = _run(ref_opt, build_scheduler(ref_opt, **cfg), total)

    opt = _sgd()
    sched = build_scheduler(opt, **cfg)
    first = _run(opt, sched, cut)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # must not need arbitrary unpickling
    opt2 = _sgd()
    # A resumed run whose config drifted: the checkpointed schedule must win.
    sched2 = build_scheduler(opt2, **{**cfg, "warmup_steps": 7, "warmup_start_factor": 1.0})
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    assert sched2.lr_lambdas[0] == sched.lr_lambdas[0]
    assert first + _run(opt2, sched2, total - cut) == pytest.approx(reference, rel=1e-12, abs=1e-15)


def test_multiplier_state_is_primitive() -> None:
    state = build_scheduler(_sgd(), **STEP).state_dict()["lr_lambdas"][0]
    assert state == {"warmup_steps": 50, "start_factor": 0.1, "milestones": (300, 600, 800), "gamma": 0.1}
    assert isinstance(make_multiplier(**COS), WarmupCosine)


# ---------------------------------------------------------------- metrics, hand-computed

# 4 samples x 3 classes. Per row: scores, target -> rank = place in (score desc, index asc) order.
LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.0],  # t=0: 0 higher -> rank 1 (rr 1),   top-1 hit
        [0.5, 0.2, 0.9],  # t=1: 2 higher -> rank 3 (rr 1/3), miss
        [1.0, 3.0, 1.0],  # t=2: 1 higher, tied with class 0 which goes first -> rank 3 (rr 1/3): miss
        [0.0, 0.0, 0.0],  # t=1: 0 higher, tied with class 0 which goes first -> rank 2 (rr 1/2): miss
    ]
)
TARGETS = torch.tensor([0, 1, 2, 1])
# top1 = 1/4; top5 clips to k=3 of 3 classes -> every sample hits = 1.0
# mrr = (1 + 1/3 + 1/3 + 1/2) / 4 = 13/24
# support = [1, 2, 1], correct = [1, 0, 0] -> recall [1, 0, 0] -> balanced acc = 1/3


def test_hand_computed_example() -> None:
    m = MetricState(3)
    m.update(LOGITS, TARGETS)
    r = m.compute()
    assert r["n"] == 4
    assert r["top1"] == 0.25
    assert r["top5"] == 1.0
    assert r["mrr"] == pytest.approx(13 / 24)
    assert r["per_class_recall"] == [1.0, 0.0, 0.0]
    assert r["balanced_acc"] == pytest.approx(1 / 3)
    assert r["loss"] == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item())


def test_top5_cutoff_with_more_classes() -> None:
    # 7 classes, scores descending with the index, so the class index is its 0-based place.
    logits = torch.arange(7, 0, -1, dtype=torch.float32).repeat(3, 1)
    m = MetricState(7)
    m.update(logits, torch.tensor([0, 4, 5]))  # places 0, 4 (5th: hit), 5 (6th: miss)
    r = m.compute()
    assert (r["top1"], r["top5"]) == (1 / 3, 2 / 3)
    assert r["mrr"] == pytest.approx((1 + 1 / 5 + 1 / 6) / 3)


def test_unsupported_class_is_nan_and_excluded() -> None:
    m = MetricState(4)
    m.update(torch.eye(4)[[0, 0, 1]], torch.tensor([0, 1, 1]))  # sample 2 correct, sample 1 wrong
    r = m.compute()
    assert r["per_class_recall"][:2] == [1.0, 0.5]
    assert all(math.isnan(x) for x in r["per_class_recall"][2:])
    assert r["balanced_acc"] == pytest.approx(0.75)


def test_explicit_loss_sum_and_nan_rows() -> None:
    m = MetricState(3)
    m.update(LOGITS, TARGETS, loss_sum=torch.tensor(2.0))
    assert m.compute()["loss"] == 0.5
    m = MetricState(3)
    m.update(torch.tensor([[float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([0, 0]))
    r = m.compute()
    assert (r["top1"], r["top5"], r["mrr"]) == (0.5, 0.5, 0.5)  # the NaN row is a miss, not rank 1
    assert math.isnan(r["loss"])


def test_matches_topk_and_sort_without_ties() -> None:
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(200, 10, generator=g), torch.randint(0, 10, (200,), generator=g)
    m = MetricState(10)
    m.update(logits, targets)
    r = m.compute()
    top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean().item()
    ranks = (logits.argsort(dim=1, descending=True) == targets[:, None]).float().argmax(dim=1) + 1
    assert r["top1"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert r["top5"] == pytest.approx(top5)
    assert r["mrr"] == pytest.approx((1.0 / ranks).mean().item())


def test_empty_and_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        MetricState(3).compute()
    m = MetricState(3)
    with pytest.raises(ValueError, match="logits"):
        m.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets"):
        m.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="targets"):
        m.update(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="loss_sum"):
        m.update(torch.zeros(2, 3), torch.tensor([0, 1]), loss_sum=torch.ones(2))
    with pytest.raises(ValueError, match="4-class"):
        m.merge(MetricState(4))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """20 samples, 6 classes; class 5 never occurs (NaN recall must survive the reduction)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 6, generator=g)
    logits[3] = 0.0  # a fully tied row
    return logits, torch.randint(0, 5, (20,), generator=g)


def _whole() -> dict:
    m = MetricState(6)
    m.update(*_data())
    return m.compute()


def _same(a: dict, b: dict) -> None:
    for key in ("n", "top1", "top5", "mrr", "balanced_acc"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    # Per-batch cross-entropy is a float32 reduction, so a different batching moves it in the 7th digit.
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert len(a["per_class_recall"]) == len(b["per_class_recall"])
    for x, y in zip(a["per_class_recall"], b["per_class_recall"]):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12)


SPLIT = 13  # uneven halves: ranks see different sample counts and class supports


def test_merge_halves_equals_whole() -> None:
    logits, targets = _data()
    a, b = MetricState(6), MetricState(6)
    a.update(logits[:SPLIT], targets[:SPLIT])
    b.update(logits[SPLIT:], targets[SPLIT:])
    _same(a.merge(b).compute(), _whole())


def test_all_reduce_without_process_group_is_noop() -> None:
    m = MetricState(3)
    m.update(LOGITS, TARGETS)
    before = m.compute()
    assert m.all_reduce().compute() == before


# ---------------------------------------------------------------- metrics, real 2-process gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=30),
    )
    try:
        logits, targets = _data()
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        m = MetricState(6)
        m.update(logits[part], targets[part])
        torch.save(m.all_reduce().compute(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gloo_all_reduce_matches_single_process(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo all_reduce did not finish within 60 s")
    for rank in range(2):
        _same(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), _whole())
