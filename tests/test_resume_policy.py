"""Resuming with a changed config (issue 14): settings that decide what a step computes are refused by
name, the rest are applied and listed in one warning, and a new length rebuilds the lr schedule.

Before trainer/resume.py, a resume with optim.base_lr 0.1 -> 3.2 and max_steps 6 -> 10 exited 0 without
a word, trained steps 7-10 at lr 0 (the old cosine had ended) and config.yaml recorded 3.2."""
from __future__ import annotations

import logging

import pytest
import yaml
from test_train import UNEVEN, config, train
from train_fixtures import final_state, metrics, write_shardset

from trainer import resume
from trainer.checkpoint import CheckpointError
from trainer.config import Backend, LoaderConfig, TrainConfig
from trainer.loop import Trainer
from trainer.runtime.choices import plain
from trainer.runtime.distributed import DistEnv
from trainer.runtime.exits import EXIT_PREEMPTED, EXIT_USAGE, exit_code
from trainer.schedule import WarmupCosine

ONE = DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "single")
# no warmup: the cosine of a 6-step run reaches 0 at step 6, which is what a longer resume ran on
BASE = ["trainer.max_steps=6", "loader.workers=0", "schedule.warmup_epochs=0", "optim.base_lr=0.1"]
PEAK = 0.1 * 4 / 256  # base_lr x global batch (4 x 1 rank x 1) / base_batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shardset(tmp_path_factory.mktemp("shards"), UNEVEN)


def resume_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainer.loop"
            and r.levelno == logging.WARNING and "resuming at step" in r.getMessage()]


def test_changed_lr_is_refused_naming_the_key_and_both_values(shards, tmp_path):
    assert train(config(shards, tmp_path / "r", *BASE)) == 0
    with pytest.raises(CheckpointError) as err:
        Trainer(config(shards, tmp_path / "r", *BASE, "optim.base_lr=3.2", "trainer.max_steps=10"), ONE)
    assert exit_code(err.value) == EXIT_USAGE
    message = str(err.value)
    assert "optim.base_lr: 0.1 -> 3.2" in message
    assert "trainer.max_steps" not in message  # a free change is not among the refused ones
    assert final_state(tmp_path / "r")["step"] == 6  # nothing was trained or written


def test_every_fixed_kind_of_setting_is_refused_together(shards, tmp_path):
    assert train(config(shards, tmp_path / "r", *BASE)) == 0
    changed = ["loader.batch_size=8", "optim.accum_steps=2", "schedule.min_factor=0.1", "trainer.seed=7",
               "data.hflip=0.0", "model.channels_last=false"]
    with pytest.raises(CheckpointError) as err:
        Trainer(config(shards, tmp_path / "r", *BASE, *changed), ONE)
    for key in ("loader.batch_size: 4 -> 8", "optim.accum_steps: 1 -> 2", "schedule.min_factor: 0.0 -> 0.1",
                "trainer.seed: 0 -> 7", "data.hflip: 0.5 -> 0.0", "model.channels_last: True -> False"):
        assert key in str(err.value)


def test_world_size_is_part_of_the_batch_and_refused():
    same = {"a": 1}
    with pytest.raises(CheckpointError, match="world size: 2 -> 1"):
        resume.check(same, same, 2, 1, "run_dir='r' holds a run at step 3")
    assert resume.check(same, same, 2, 2, "r") == []


def test_longer_run_rebuilds_the_schedule_and_says_how_the_lr_changes(shards, tmp_path, caplog):
    run = tmp_path / "r"
    assert train(config(shards, run, *BASE)) == 0
    ended = [m for m in metrics(run) if m["split"] == "train" and m["step"] == 6]
    assert ended[0]["lr"] == 0.0  # the old cosine ends at step 6
    caplog.set_level(logging.WARNING)
    trainer = Trainer(config(shards, run, *BASE[1:], "trainer.max_steps=10"), ONE)
    new = WarmupCosine(total_steps=10, warmup_steps=0, start_factor=1.0)
    try:
        # step 7, the first after the resume, trains at the new schedule's lr, not at 0
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(PEAK * new(6), rel=1e-12)
        assert trainer.scheduler.get_last_lr()[0] == pytest.approx(PEAK * new(6), rel=1e-12)
        code = trainer.fit()
    finally:
        trainer.close()
    assert code == 0
    [warning] = resume_warnings(caplog)
    assert "trainer.max_steps: 6 -> 10" in warning
    assert "cosine now ends at step 10 instead of 6" in warning
    assert f"step 7, the first after the resume, trains at lr {PEAK * new(6):.6g}" in warning
    assert "(the old schedule: 0)" in warning
    logged = {m["step"]: m["lr"] for m in metrics(run) if m["split"] == "train" and "lr" in m}
    for step in (8, 10):
        assert logged[step] == pytest.approx(PEAK * new(step), rel=1e-12)
    assert logged[8] > 0
    state = final_state(run)
    assert state["step"] == 10 and state["scheduler"]["lr_lambdas"][0]["total_steps"] == 10
    assert state["recipe"]["total_steps"] == 10
    assert state["recipe"]["lr_schedule_changes"] == [
        {"step": 6, "before": str(WarmupCosine(6, 0, 1.0)), "after": str(new)}]
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 10


def test_free_changes_only_run_and_are_listed_in_one_warning(shards, tmp_path, caplog):
    run = tmp_path / "r"
    first = [*BASE, "trainer.stop_at_step=3", "logger.project=first"]
    assert train(config(shards, run, *first)) == EXIT_PREEMPTED
    caplog.set_level(logging.WARNING)
    assert train(config(shards, run, *first, "loader.workers=1", "logger.project=second",
                        "trainer.log_every=1")) == 0
    assert final_state(run)["step"] == 6
    [warning] = resume_warnings(caplog)
    listed = warning.split("applied from here on: ")[1]
    assert listed == ("loader.workers: 0 -> 1; logger.project: 'first' -> 'second'; "
                      "trainer.log_every: 2 -> 1")  # and no lr schedule sentence: the length is the same
    assert [m["step"] for m in metrics(run) if m["split"] == "train" and "lr" in m] == [2, 4, 5, 6]


def test_an_unchanged_resume_warns_nothing(shards, tmp_path, caplog):
    run = tmp_path / "r"
    assert train(config(shards, run, *BASE, "trainer.stop_at_step=3")) == EXIT_PREEMPTED
    caplog.set_level(logging.WARNING)
    assert train(config(shards, run, *BASE, "trainer.stop_at_step=3")) == 0
    assert resume_warnings(caplog) == []


def test_every_setting_has_a_row_in_the_policy_table():
    """A new setting must be decided on (fixed or free) in trainer/resume.py, not fall to the default."""
    keys = resume.flatten(plain(TrainConfig(loader=LoaderConfig(backend=Backend.synthetic), run_dir="r")))

    def row(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:n]) in resume.POLICY for n in range(1, len(parts) + 1))

    assert [k for k in keys if not row(k)] == []
    assert resume.policy("optim.base_lr") == resume.FIXED
    assert resume.policy("trainer.max_steps") == resume.FREE
    assert resume.policy("data.check") == resume.FREE and resume.policy("data.shards") == resume.FREE
    assert resume.policy("data.crop_size") == resume.FIXED
