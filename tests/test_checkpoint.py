"""RNG capture/restore and the checkpointer: exact replay of every random stream, weights_only round trips
of a realistic training state (and bit-identical training after resume), retention, best tracking,
corruption fallback, and a real SIGKILL in the middle of a save."""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import rng
from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.runtime.files import TEMP_INFIX
from trainer.schedule import build_scheduler

REPO = Path(__file__).resolve().parents[1]


def weights_only_round_trip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep equality that also checks container types and tensor dtypes (== alone would miss those)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------- rng

BIT_GENERATORS = [np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64, np.random.MT19937]


def draw(gen: np.random.Generator) -> tuple:
    return (torch.rand(5).tolist(), torch.randn(3).tolist(), random.random(), random.gauss(0, 1),
            np.random.rand(4).tolist(), np.random.standard_normal(), gen.random(3).tolist(),
            gen.integers(0, 2**62, 2).tolist())


@pytest.mark.parametrize("through_disk", [False, True], ids=["in-memory", "weights_only"])
@pytest.mark.parametrize("bit_generator", BIT_GENERATORS, ids=lambda c: c.__name__)
def test_rng_restore_replays_every_stream(bit_generator: type, through_disk: bool) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    gen = np.random.Generator(bit_generator(4))
    # An odd number of normal draws leaves a cached second Gaussian in random and NumPy (and Philox a
    # half-used buffer): the state that is easiest to lose.
    random.gauss(0, 1), np.random.standard_normal(), gen.integers(0, 2**32, dtype=np.uint32)
    state = rng.capture(gen)
    if through_disk:
        state = weights_only_round_trip(state)
    first = draw(gen)
    rng.restore(state, gen)
    assert draw(gen) == first


def test_rng_state_round_trips_weights_only_with_128_bit_ints() -> None:
    gen = np.random.default_rng(12345)  # PCG64: 128-bit state and increment
    state = rng.capture(gen)
    big = state["generator"]["state"]
    assert max(big["state"], big["inc"]) > 2**64  # the case weights_only might have refused
    loaded = weights_only_round_trip(state)
    assert_same(state, loaded)
    assert loaded["generator"]["state"]["inc"] == gen.bit_generator.state["state"]["inc"]


def test_rng_capture_skips_uninitialised_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden() -> None:
        raise AssertionError("capture must not initialise CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", forbidden)
    assert rng.capture()["cuda"] == []


def test_rng_restore_cuda_state_without_cuda_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    state = rng.capture()
    state["cuda"] = [torch.get_rng_state(), torch.get_rng_state()]  # stand-ins for two GPUs' states
    expected = torch.rand(3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="trainer.rng"):
        rng.restore(state)
    assert "CUDA is not available" in caplog.text
    assert torch.equal(torch.rand(3), expected)  # the other streams were still restored


@pytest.mark.parametrize("saved, visible, restored", [(2, 1, [0]), (1, 2, [0]), (2, 2, [0, 1])])
def test_rng_restore_cuda_device_count_mismatch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, saved: int, visible: int,
    restored: list[int],
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append(device))
    state = rng.capture()
    state["cuda"] = [torch.get_rng_state()] * saved
    with caplog.at_level(logging.WARNING, logger="trainer.rng"):
        rng.restore(state)
    assert calls == restored
    assert ("restoring the first" in caplog.text) == (saved != visible)


def test_rng_restore_rejects_mismatched_generator() -> None:
    with pytest.raises(ValueError, match="captured generator is PCG64, the one passed is Philox"):
        rng.restore(rng.capture(np.random.default_rng(0)), np.random.Generator(np.random.Philox(0)))
    with pytest.raises(ValueError, match="has none"):
        rng.restore(rng.capture(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="version"):
        rng.restore({"version": 99})


# ---------------------------------------------------------------- realistic training state


def make_training(seed: int) -> tuple[nn.Module, torch.optim.SGD, Any, torch.amp.GradScaler]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 5)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = build_scheduler(opt, "cosine", total_steps=100, warmup_steps=5, warmup_start_factor=0.1)
    return model, opt, sched, torch.amp.GradScaler("cpu")


def train_step(model: nn.Module, opt: torch.optim.SGD, sched: Any, scaler: torch.amp.GradScaler) -> None:
    # Data, dropout and a loss jitter draw from torch, NumPy and Python RNGs, so resuming is only
    # bit-identical if all three were restored.
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    jitter = 1 + 0.01 * (np.random.rand() + random.random())
    loss = F.cross_entropy(model(x), y) * jitter
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


def training_state(model: nn.Module, opt: Any, sched: Any, scaler: torch.amp.GradScaler, step: int) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng.capture(),
        "progress": {"step": step, "epoch": 0, "samples_seen": 4 * step, "best_top1": 0.125},
        "history": [{"step": 1, "loss": 2.5, "lr": 0.01}, {"step": 2, "loss": 2.25, "lr": 0.028}],
        "config": {"arch": "tiny-cnn", "lr": 0.1, "milestones": (30, 60), "amp": True, "resume": None,
                   "shards": ["train-000000.tar", "train-000001.tar"]},
    }


def test_round_trip_realistic_state_and_resume_is_bit_identical(tmp_path: Path) -> None:
    model, opt, sched, scaler = make_training(0)
    np.random.seed(0)
    random.seed(0)
    train_step(model, opt, sched, scaler)
    state = training_state(model, opt, sched, scaler, step=1)
    assert opt.state_dict()["state"][0]["momentum_buffer"] is not None  # momentum really is in the state

    ck = Checkpointer(tmp_path / "ck")
    path = ck.save(state, step=1)
    assert path == tmp_path / "ck" / "step-000000001.pt" and ck.latest() == path
    assert_same(state, Checkpointer.load(path))
    loaded = ck.load_latest()
    assert_same(state, loaded)

    train_step(model, opt, sched, scaler)  # the uninterrupted run's next step

    model2, opt2, sched2, scaler2 = make_training(seed=123)  # a fresh process: different init, RNG
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    scaler2.load_state_dict(loaded["scaler"])
    rng.restore(loaded["rng"])
    train_step(model2, opt2, sched2, scaler2)

    assert_same(model.state_dict(), model2.state_dict(), "model")
    assert_same(opt.state_dict(), opt2.state_dict(), "optimizer")
    assert sched.get_last_lr() == sched2.get_last_lr()


# ---------------------------------------------------------------- checkpointer


def small_state(step: int) -> dict:
    return {"step": step, "w": torch.full((16,), float(step))}


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_retention_keeps_exactly_k(tmp_path: Path, keep_last: int) -> None:
    ck = Checkpointer(tmp_path, keep_last=keep_last)
    for step in range(0, 60, 10):
        ck.save(small_state(step), step)
    kept = list(range(50, 50 - 10 * keep_last, -10))
    assert files(tmp_path) == sorted(f"step-{s:09d}.{ext}" for s in kept for ext in ("pt", "done"))
    assert Checkpointer.load(ck.latest())["step"] == 50


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_keep_last_is_validated(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=bad)


@pytest.mark.parametrize(
    "higher_is_better, metrics, best_step",
    [(True, [0.5, 0.7, 0.6, 0.7, 0.9, 0.1], 40), (False, [2.0, 1.5, 1.8, 1.5, 0.9, 3.0], 40)],
    ids=["higher", "lower"],
)
def test_best_updates_only_on_improvement_and_survives_restart(
    tmp_path: Path, higher_is_better: bool, metrics: list[float], best_step: int
) -> None:
    ck = Checkpointer(tmp_path, keep_last=1)
    bests = []
    for i, metric in enumerate(metrics):
        ck.save(small_state(10 * i), 10 * i, metric=metric, higher_is_better=higher_is_better)
        bests.append(ck.best["step"])
    # A tie (the second 0.7 / 1.5) is not an improvement: the earlier checkpoint stays best.
    assert bests == [0, 10, 10, 10, 40, 40]
    assert Checkpointer.load(tmp_path / "best.pt")["step"] == best_step  # although retention dropped it

    again = Checkpointer(tmp_path, keep_last=1)
    assert again.best == {"step": 40, "metric": metrics[4], "higher_is_better": higher_is_better}
    worse = metrics[0]
    again.save(small_state(60), 60, metric=worse, higher_is_better=higher_is_better)
    assert Checkpointer.load(tmp_path / "best.pt")["step"] == best_step


def test_best_rejects_direction_change_and_ignores_nan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        ck.save(small_state(1), 1, metric=float("nan"))
    assert ck.best is None and not (tmp_path / "best.pt").exists() and "NaN" in caplog.text
    ck.save(small_state(2), 2, metric=0.5)
    with pytest.raises(ValueError, match="higher_is_better"):
        Checkpointer(tmp_path).save(small_state(3), 3, metric=0.1, higher_is_better=False)
    assert Checkpointer.load(tmp_path / "step-000000003.pt")["step"] == 3  # the progress itself is kept
    assert Checkpointer.load(tmp_path / "best.pt")["step"] == 2
    (tmp_path / "best.json").write_text('{"step": 2}')
    # Malformed: no KeyError later. best.done's entry carries the metric too, so the record is restored.
    assert Checkpointer(tmp_path).best == {"step": 2, "metric": 0.5, "higher_is_better": True}
    assert '"metric": 0.5' in (tmp_path / "best.json").read_text()


def test_interrupted_best_update_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Checkpointer(tmp_path).save(small_state(1), 1, metric=0.9)
    (tmp_path / "best.done").unlink()  # what an older taxotrain's kill between best.pt and best.done left
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        ck = Checkpointer(tmp_path)
    # best.json records best.pt's sha256: that proves the file whole, so the marker is rewritten.
    assert ck.best == {"step": 1, "metric": 0.9, "higher_is_better": True}
    assert "proven by sha256" in caplog.text
    assert (tmp_path / "best.done").exists() and Checkpointer.load(tmp_path / "best.pt")["step"] == 1
    # Bytes that no marker, best.json or step marker records are not trusted.
    (tmp_path / "best.done").unlink()
    buf = io.BytesIO()
    torch.save(small_state(7), buf)
    (tmp_path / "best.pt").write_bytes(buf.getvalue())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        ck = Checkpointer(tmp_path)
    assert ck.best is None and "best checkpoint is incomplete" in caplog.text
    with pytest.raises(CheckpointError, match="best.pt: no completeness marker"):
        Checkpointer.load(tmp_path / "best.pt")
    ck.save(small_state(2), 2, metric=0.1)  # rewritten at the next metric, even a worse one
    assert Checkpointer.load(tmp_path / "best.pt")["step"] == 2


def test_pt_without_marker_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = Checkpointer(tmp_path)
    ck.save(small_state(1), 1)
    ck.save(small_state(2), 2)
    # A complete-looking file whose save was killed before the marker was written.
    (tmp_path / "step-000000003.pt").write_bytes((tmp_path / "step-000000002.pt").read_bytes())
    assert ck.latest() == tmp_path / "step-000000002.pt"
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert ck.load_latest()["step"] == 2
    assert "step-000000003.pt" in caplog.text
    with pytest.raises(CheckpointError, match="step-000000003.pt: no completeness marker"):
        Checkpointer.load(tmp_path / "step-000000003.pt")


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped bit in the middle: same size, so only the sha256 can tell
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_corrupt_newest_falls_back_to_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    ck = Checkpointer(tmp_path)
    ck.save(small_state(1), 1)
    ck.save(small_state(2), 2)
    newest = tmp_path / "step-000000002.pt"
    corrupt(newest, how)
    # latest() is the cheap check: it sees truncation but not a flipped bit.
    assert ck.latest() == (tmp_path / "step-000000001.pt" if how == "truncate" else newest)
    with pytest.raises(CheckpointError, match="step-000000002.pt"):
        Checkpointer.load(newest)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert ck.load_latest()["step"] == 1
    assert "skipping unusable checkpoint" in caplog.text and "step-000000002.pt" in caplog.text
    path, state = ck.load_newest()  # the file it fell back to, for errors that name it
    assert path == tmp_path / "step-000000001.pt" and state["step"] == 1


def test_all_corrupt_raises(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    ck.save(small_state(1), 1)
    ck.save(small_state(2), 2)
    corrupt(tmp_path / "step-000000001.pt", "bitflip")
    (tmp_path / "step-000000002.done").write_text("{not json")
    with pytest.raises(CheckpointError, match="step-000000002.pt, step-000000001.pt"):
        ck.load_latest()


def test_nothing_to_resume_from(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path / "fresh").load_latest() is None
    assert Checkpointer(tmp_path / "missing", is_main=False).load_latest() is None
    assert Checkpointer(tmp_path / "fresh").latest() is None


def test_non_main_rank_writes_nothing(tmp_path: Path) -> None:
    worker = Checkpointer(tmp_path / "ck", is_main=False)
    assert worker.save(small_state(1), 1, metric=1.0) is None
    assert not (tmp_path / "ck").exists()
    Checkpointer(tmp_path / "ck").save(small_state(2), 2, metric=0.5)
    before = files(tmp_path / "ck")
    assert worker.save(small_state(3), 3, metric=1.0) is None
    assert files(tmp_path / "ck") == before
    assert worker.load_latest()["step"] == 2  # but every rank can resume


def test_state_that_weights_only_refuses_is_not_saved(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="weights_only"):
        ck.save({"numpy_rng": np.random.get_state()}, 1)  # holds a raw NumPy array
    assert files(tmp_path) == []


def test_stale_temporaries_are_removed_but_nothing_else(tmp_path: Path) -> None:
    stale = [".step-000000007.pt.tmp-4242-deadbeef", ".best.json.tmp-4242-0badf00d"]
    for name in [*stale, "notes.tmp.txt"]:
        (tmp_path / name).write_bytes(b"x")
    Checkpointer(tmp_path).save(small_state(1), 1)
    assert files(tmp_path) == ["notes.tmp.txt", "step-000000001.done", "step-000000001.pt"]


def test_resave_same_step_and_warn_about_newer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = Checkpointer(tmp_path)
    ck.save(small_state(5), 5)
    ck.save({"step": 5, "w": torch.zeros(1000)}, 5)  # a different size: the old marker must not survive
    assert Checkpointer.load(tmp_path / "step-000000005.pt")["w"].shape == (1000,)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        ck.save(small_state(3), 3)  # a rolled-back run
    assert "newer checkpoints exist" in caplog.text
    assert ck.load_latest()["step"] == 5


KILLED_WRITER = """
import sys, torch
from trainer.checkpoint import Checkpointer
ck = Checkpointer(sys.argv[1], keep_last=2)
step = 0
while True:
    ck.save({"step": step, "w": torch.full((6_000_000,), float(step))}, step, metric=float(step))  # 24 MB
    step += 1
"""


def step_temporary(name: str) -> bool:
    """A step checkpoint's temporary as trainer.runtime.files.atomic_write names it."""
    return name.startswith(".step-") and TEMP_INFIX in name


def kill_writer_mid_save(directory: Path) -> list[str]:
    """Start KILLED_WRITER, SIGKILL it while it writes a step after the first, return what it left."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(directory)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            names = os.listdir(directory) if directory.exists() else []
            if "step-000000000.done" in names and any(map(step_temporary, names)):
                break
            time.sleep(0.001)
        else:
            pytest.fail("the writer never started a second save")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return sorted(os.listdir(directory))


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    # The kill is aimed at the moment a step's temporary is on disk; the write may still win that race,
    # so retry until one attempt provably died mid-write (normally the first).
    for attempt in range(3):
        directory = tmp_path / f"ck{attempt}"
        left = kill_writer_mid_save(directory)
        ck = Checkpointer(directory, keep_last=2)
        state = ck.load_latest()
        assert state is not None, left
        assert torch.equal(state["w"], torch.full((6_000_000,), float(state["step"])))
        assert Checkpointer.load(ck.latest())["step"] == state["step"]
        if ck.best is not None:  # None if the kill hit a best update: that is detected, not trusted
            assert Checkpointer.load(directory / "best.pt")["step"] == ck.best["step"] <= state["step"]
        # The next save of the restarted run clears whatever the killed one left half-written.
        ck.save(small_state(state["step"] + 1), state["step"] + 1)
        assert not [n for n in os.listdir(directory) if TEMP_INFIX in n]
        if any(map(step_temporary, left)):
            return
    pytest.fail("no attempt was killed in the middle of writing a checkpoint")


# ---------------------------------------------------------------- lean best: a hard link, and the size report


def names_bytes(directory: Path) -> int:
    """The bytes of every name in `directory`, as if each were its own copy."""
    return sum((directory / n).stat().st_size for n in os.listdir(directory))


def test_best_is_a_hard_link_to_its_step_and_outlives_the_steps_pruning(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save(small_state(1), 1, metric=0.5)
    best, step = tmp_path / "best.pt", tmp_path / "step-000000001.pt"
    assert best.stat().st_ino == step.stat().st_ino and best.stat().st_nlink == 2
    # the report counts the shared bytes once: what a byte copy used to cost is saved
    assert ck.disk_usage() == (names_bytes(tmp_path) - best.stat().st_size, len(os.listdir(tmp_path)) - 1)
    ck.save(small_state(2), 2, metric=0.4)  # worse: best stays at step 1, whose step file is pruned
    assert not step.exists() and best.stat().st_nlink == 1
    assert Checkpointer.load(best)["step"] == 1 and Checkpointer(tmp_path).best["step"] == 1
    assert ck.disk_usage() == (names_bytes(tmp_path), len(os.listdir(tmp_path)))


def test_where_hard_links_fail_best_is_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def refuse(src: Path, dst: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr(os, "link", refuse)  # as on FAT or some FUSE and network filesystems
    with caplog.at_level(logging.INFO, logger="trainer.checkpoint"):
        Checkpointer(tmp_path).save(small_state(1), 1, metric=0.5)
    best, step = tmp_path / "best.pt", tmp_path / "step-000000001.pt"
    assert "writing a copy" in caplog.text and best.stat().st_ino != step.stat().st_ino
    assert best.read_bytes() == step.read_bytes() and Checkpointer.load(best)["step"] == 1
    assert not [n for n in os.listdir(tmp_path) if TEMP_INFIX in n]
    assert Checkpointer(tmp_path).disk_usage()[0] == names_bytes(tmp_path)


def test_a_finished_run_reports_its_checkpoints_size_in_the_log_and_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from test_train import UNEVEN, config, train
    from train_fixtures import write_shardset

    shards = write_shardset(tmp_path / "shards", UNEVEN)
    run_dir = tmp_path / "run"
    cfg = config(shards, run_dir, "trainer.max_steps=4", "trainer.checkpoint_every=1", "trainer.keep_last=2",
                 "loader.workers=0")
    with caplog.at_level(logging.INFO, logger="trainer.loop"):
        assert train(cfg) == 0
    directory = run_dir / "checkpoints"
    # validated once, at the last step: best.pt is that step's file under a second name
    assert (directory / "best.pt").stat().st_ino == (directory / "step-000000004.pt").stat().st_ino
    assert sorted(n for n in os.listdir(directory) if n.endswith(".pt")) == \
        ["best.pt", "step-000000003.pt", "step-000000004.pt"]
    size = names_bytes(directory) - (directory / "best.pt").stat().st_size
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checkpoint_bytes"] == size
    files = len(os.listdir(directory)) - 1  # best.pt is no file of its own
    line = f"checkpoints: {size / 1e6:.1f} MB in {files} files in {directory} (trainer.keep_last=2"
    assert line in caplog.text
