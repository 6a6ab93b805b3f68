"""Fixed costs per epoch (issue 18): DataLoader workers that live for the whole run, and epoch-end
checkpoints written in the background or spaced out in time, all without changing a single batch or
a resumed run's bits. Speed is measured by benchmarks/epoch_overhead.py, never here."""
from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_train import train
from train_fixtures import assert_same_training_state, final_state, metrics, write_shardset

from trainer.checkpoint import Checkpointer
from trainer.config import TrainConfig
from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.streams import Batch, EpochPosition, StreamConfig
from trainer.data.transforms import AugmentConfig, train_transform
from trainer.loop import Trainer
from trainer.runtime import files
from trainer.runtime.cli import typed
from trainer.runtime.exits import EXIT_PREEMPTED, ConfigError, RunFailure

UNEVEN = {"train": [37, 5, 22, 3, 30, 11, 2, 19], "val": [13, 4, 9]}
AUG = AugmentConfig(crop_size=12, scale=(0.3, 1.0))
# batch 16 over 129 samples: 8 steps an epoch, so 3 epochs are 24 short steps
SMALL = ["model.name=mobilenet_v3_small", "data.crop_size=16", "data.scale=[0.5,1.0]", "loader.batch_size=16",
         "optim.base_lr=0.05", "schedule.warmup_epochs=0.5", "logger.mode=disabled", "trainer.log_every=4",
         "loader.pin_memory=false", "data.check=size"]
REPO = Path(__file__).resolve().parents[1]
OLD = ["loader.persistent_workers=false", "trainer.checkpoint_async=false"]  # the behaviour before


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shardset(tmp_path_factory.mktemp("shards"), UNEVEN)


def children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


# ---------------------------------------------------------------- persistent workers, same batches


def loader(root: Path, workers: int, persistent: bool) -> data.ShardLoader:
    split = shardset.load(root, "train")
    bpe = data.steps_per_epoch(split.num_samples, 4, 2, 1)
    stream = data.TrainStream(split, train_transform(AUG), StreamConfig(4, 0, 16, 4), 1, 2, workers, bpe)
    return data.ShardLoader(stream, workers, persistent=persistent)


def digest(batch: Batch) -> str:
    h = hashlib.sha256(batch.images.numpy().tobytes())
    h.update(batch.labels.numpy().tobytes())
    h.update(f"{batch.worker} {batch.consumed} {batch.bad}".encode())
    return h.hexdigest()


def digests(batches: Iterator[Batch], limit: int | None = None) -> list[str]:
    """The digests of the first `limit` batches (all without), the epoch then closed as the trainer does."""
    out = []
    try:
        for batch in batches:
            out.append(digest(batch))
            if len(out) == limit:
                break
    finally:
        batches.close()
    return out


def position_after(stop: int, source: data.ShardLoader, epoch: int) -> EpochPosition:
    position = EpochPosition()
    for batch in list(source.epoch(epoch))[:stop]:
        position.advance(batch, source.stream.workers)
    return position


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_persistent_workers_give_every_batch_of_new_workers_each_epoch_and_after_a_resume(shards, workers):
    before = children()
    old, new = loader(shards, workers, persistent=False), loader(shards, workers, persistent=True)
    want = {e: digests(old.epoch(e)) for e in range(3)}
    assert len(want[0]) == old.batches_per_epoch and want[0] != want[1] != want[2]
    pids = []
    for epoch in range(3):
        batches = new.epoch(epoch)
        got = [digest(next(batches))]
        pids.append(children() - before)  # while the epoch runs
        got += digests(batches)
        assert got == want[epoch], f"epoch {epoch}"
    assert all(p == pids[0] for p in pids) and len(pids[0]) == workers  # the same processes throughout
    # an epoch cut short (a stop), then a resume mid-epoch on the same workers: what a fresh run gives
    assert digests(new.epoch(1), limit=3) == want[1][:3]
    position = position_after(5, old, 1)
    assert digests(new.epoch(1, position)) == want[1][5:]
    assert digests(new.epoch(2)) == want[2]
    new.close()
    new.close()  # idempotent
    assert children() - before == set()


def test_old_path_forks_new_workers_each_epoch(shards):
    """The control: without persistence every epoch has other worker processes."""
    before, old, seen = children(), loader(shards, 1, persistent=False), []
    for epoch in range(2):
        batches = old.epoch(epoch)
        next(batches)
        seen.append(children() - before)
        batches.close()
    assert seen[0] and seen[1] and not seen[0] & seen[1]


# ---------------------------------------------------------------- the trainer


def config(shards: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    dots = [f"data.shards={shards}", f"run_dir={run_dir}", *SMALL, *overrides]
    return typed(TrainConfig, OmegaConf.from_dotlist(dots))


def steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:14]) for p in (run_dir / "checkpoints").glob("step-*.done"))


def test_new_run_stopped_and_resumed_equals_the_old_uninterrupted_run_and_leaves_no_worker(shards, tmp_path):
    before = children()
    common = ["trainer.max_steps=20", "loader.workers=2", "trainer.checkpoint_every=3"]
    assert train(config(shards, tmp_path / "old", *common, *OLD)) == 0
    # stop inside epoch 1 (step 11 of 8-step epochs), then finish: 2 train + 2 validation workers each time
    assert train(config(shards, tmp_path / "new", *common, "trainer.stop_at_step=11")) == EXIT_PREEMPTED
    assert children() - before == set()
    assert final_state(tmp_path / "new")["step"] == 11  # the stop's save waited for the background one
    assert train(config(shards, tmp_path / "new", *common, "trainer.stop_at_step=11")) == 0
    assert children() - before == set()
    assert_same_training_state(final_state(tmp_path / "old"), final_state(tmp_path / "new"))
    val = [(m["step"], m["top1"], m["loss"]) for m in metrics(tmp_path / "old") if m["split"] == "val"]
    assert val == [(m["step"], m["top1"], m["loss"]) for m in metrics(tmp_path / "new")
                   if m["split"] == "val"]
    # the old run's files and the new run's background ones hold the same states
    saved = steps_saved(tmp_path / "old")
    assert saved == steps_saved(tmp_path / "new") == [16, 18, 20]  # keep_last=3 of epoch ends and every 3rd
    for step in saved:
        name = f"checkpoints/step-{step:09d}.pt"
        assert_same_training_state(Checkpointer.load(tmp_path / "old" / name),
                                   Checkpointer.load(tmp_path / "new" / name))


def test_an_error_mid_epoch_still_ends_the_persistent_workers(shards, tmp_path, monkeypatch):
    before, step = children(), Trainer._optimizer_step

    def failing(self, micro, meter):
        if self.step == 10:  # in epoch 1: the validation workers exist too
            raise RuntimeError("boom")
        step(self, micro, meter)

    monkeypatch.setattr(Trainer, "_optimizer_step", failing)
    with pytest.raises(RuntimeError, match="boom") as raised:
        train(config(shards, tmp_path / "r", "trainer.max_steps=20", "loader.workers=1"))
    # `raised` still holds the traceback and its frames: close() ended the workers all the same
    assert raised.value and children() - before == set()


def test_a_stop_signal_to_every_process_ends_the_run_with_a_checkpoint_and_no_worker(shards, tmp_path,
                                                                                     monkeypatch, caplog):
    """As `scancel --signal` reaches every process of a job step: the workers (training and validation)
    ignore it, the training process stops at the next step, saves, exits 75 and ends them."""
    before, step = children(), Trainer._optimizer_step

    def signalled(self, micro, meter):
        step(self, micro, meter)
        if self.step == 10:
            workers = children() - before
            assert len(workers) == 2  # one for training, one for validation
            for pid in (*workers, os.getpid()):
                os.kill(pid, signal.SIGUSR2)

    monkeypatch.setattr(Trainer, "_optimizer_step", signalled)
    assert train(config(shards, tmp_path / "r", "trainer.max_steps=40", "loader.workers=1")) == EXIT_PREEMPTED
    assert children() - before == set()
    assert steps_saved(tmp_path / "r")[-1] == 11  # the step under way finished, then the stop
    assert "exited unexpectedly" not in caplog.text


# ---------------------------------------------------------------- background checkpoints


def state(step: int) -> dict:
    net = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(2, 8)).sum().backward()
    opt.step()
    return {"step": step, "model": net.state_dict(), "optimizer": opt.state_dict(),
            "rng": [torch.get_rng_state()]}


def test_background_saves_write_the_bytes_of_synchronous_ones_from_snapshots(tmp_path):
    sync, background = Checkpointer(tmp_path / "sync"), Checkpointer(tmp_path / "background")
    live, memory = state(3), []
    for step in (3, 4):  # the second copy goes into the memory of the first (written by then)
        live["step"] = step
        sync.save(live, step, metric=step / 10)
        expected = Checkpointer.load(tmp_path / "sync" / f"step-{step:09d}.pt")
        path = background.save(live, step, metric=step / 10, background=True)
        for tensor in live["model"].values():  # the next optimizer step, while the thread writes
            tensor.add_(1.0)
        background.wait()
        memory.append([t.data_ptr() for t in background._spare["model"].values()])
        assert path == tmp_path / "background" / f"step-{step:09d}.pt"
        for name in (path.name, "best.pt"):
            assert (tmp_path / "sync" / name).read_bytes() == (tmp_path / "background" / name).read_bytes()
        loaded = Checkpointer.load(path)
        assert all(torch.equal(loaded["model"][k], expected["model"][k]) for k in expected["model"])
    assert background.best == sync.best == {"step": 4, "metric": 0.4, "higher_is_better": True}
    assert memory[0] == memory[1]


def fail_fsync_of(name: str, monkeypatch) -> None:
    fsync = files._fsync_file

    def full(path: Path) -> None:
        if name in Path(path).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        fsync(path)

    monkeypatch.setattr(files, "_fsync_file", full)


def test_a_background_write_error_is_raised_once_naming_the_path(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=2)
    ck.save(state(1), 1)
    fail_fsync_of("step-000000002.pt", monkeypatch)
    ck.save(state(2), 2, background=True)  # returns: the error belongs to the thread
    with pytest.raises(RunFailure, match="step-000000002.pt.*No space left"):
        ck.save(state(3), 3, background=True)  # the next save raises it before starting
    ck.wait()  # raised once; nothing is under way
    assert ck.load_latest()["step"] == 1 and sorted(p.name for p in tmp_path.glob("step-*")) == [
        "step-000000001.done", "step-000000001.pt"]


def test_a_background_write_error_fails_the_run_naming_the_path(shards, tmp_path, monkeypatch):
    fail_fsync_of("step-000000008.pt", monkeypatch)  # the end of epoch 0, written in the background
    with pytest.raises(RunFailure, match="step-000000008.pt.*No space left"):
        train(config(shards, tmp_path / "r", "trainer.max_steps=20", "loader.workers=0"))
    assert steps_saved(tmp_path / "r") == []


# ---------------------------------------------------------------- trainer.checkpoint_every_s


def test_checkpoints_spaced_in_time_keep_the_last_epoch_and_every_better_metric(shards, tmp_path):
    spaced = ["trainer.epochs=4", "loader.workers=0", "trainer.checkpoint_every_s=3600",
              "trainer.keep_last=4"]
    assert train(config(shards, tmp_path / "plain", "trainer.epochs=4", "loader.workers=0",
                        "data.val_split=null", "trainer.keep_last=4")) == 0
    assert steps_saved(tmp_path / "plain") == [8, 16, 24, 32]  # the default: every epoch end
    assert train(config(shards, tmp_path / "noval", *spaced, "data.val_split=null")) == 0
    assert steps_saved(tmp_path / "noval") == [32]
    assert train(config(shards, tmp_path / "val", *spaced)) == 0
    best, improved = None, []
    for m in (m for m in metrics(tmp_path / "val") if m["split"] == "val"):
        if best is None or m["top1"] > best:
            best = m["top1"]
            improved.append(m["step"])
    assert steps_saved(tmp_path / "val") == sorted(set(improved) | {32})
    assert Checkpointer(tmp_path / "val" / "checkpoints").best["step"] == improved[-1]
    # the same training whatever was saved
    assert_same_training_state(final_state(tmp_path / "plain"), final_state(tmp_path / "noval"))


def test_a_stop_saves_whatever_the_interval_and_resumes_bitwise(shards, tmp_path):
    common = ["trainer.max_steps=20", "loader.workers=1", "data.val_split=null"]
    assert train(config(shards, tmp_path / "a", *common, *OLD)) == 0
    spaced = [*common, "trainer.checkpoint_every_s=3600", "trainer.stop_at_step=13"]
    assert train(config(shards, tmp_path / "b", *spaced)) == EXIT_PREEMPTED
    assert steps_saved(tmp_path / "b") == [13]  # epoch 0's end was skipped; the stop was not
    assert train(config(shards, tmp_path / "b", *spaced)) == 0
    assert_same_training_state(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_checkpoint_interval_must_be_positive(shards, tmp_path, value):
    with pytest.raises(ConfigError, match="trainer.checkpoint_every_s"):
        config(shards, tmp_path, f"trainer.checkpoint_every_s={value}")


# ---------------------------------------------------------------- the benchmark's arithmetic


def test_the_benchmark_times_a_run_and_its_table_adds_up(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import epoch_overhead as bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    shards = bench.make_shards(tmp_path, 24)
    overrides = [f"data.shards={shards}", f"run_dir={tmp_path / 'r'}", *SMALL[:3], "loader.batch_size=4",
                 "logger.mode=disabled", "loader.workers=0", "trainer.epochs=2", "loader.pin_memory=false"]
    run = bench.one_run({"overrides": overrides})
    assert run["epochs"] == 2 and 0 < run["model"] < run["wall"] and run["steps_measured"] > 0
    assert run["overhead_per_epoch"] == pytest.approx((run["wall"] - run["model"]) / 2)
    assert 0 < run["epoch_end_besides_val_forward"] < run["wall"] - run["model"]
    [row] = bench.summarise({(0, "new"): [run]})
    assert row["overhead_per_epoch"] == row["min"] == row["max"] == run["overhead_per_epoch"]
    assert "| 0 | new | 1 |" in bench.markdown([row])
