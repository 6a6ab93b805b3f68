"""Tracker (metrics.jsonl + W&B offline) and provenance: rank isolation, resume, failure isolation, secrets.

Every W&B run here is offline and W&B's base URL points at a closed local port: nothing can reach the
network even if a test were wrong about the mode.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.tracking import provenance
from trainer.tracking.provenance import REDACTED, redact_argv, redact_mapping
from trainer.tracking.tracker import METRICS_FILE, RUN_ID_FILE, Tracker, jsonable, wandb_payload

FAKE_SECRETS = {
    "WANDB_API_KEY": "taxotrain-fake-secret-1234567890",
    "MY_SERVICE_TOKEN": "taxotrain-fake-secret-token-0987654321",
    "SLURM_FAKE_PASSWORD": "taxotrain-fake-secret-slurm",
}
ARGV_SECRET = "taxotrain-fake-secret-argv"
FLAG_SECRET = "taxotrain-fake-secret-flag"
URL_SECRET = "taxotrain-fake-secret-url"
CONFIG_SECRET = "taxotrain-fake-secret-config"


pytestmark = pytest.mark.usefixtures("offline_wandb")  # tests/conftest.py


def make(run_dir: Path, mode: str = "offline", *, is_main: bool = True, **kw) -> Tracker:
    return Tracker(
        run_dir, is_main=is_main, mode=mode, project="taxotrain-tests", name="t", config={"lr": 0.1}, **kw
    )


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def tracker_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "trainer.tracking.tracker" and r.levelno == logging.WARNING]


# metrics.jsonl ----------------------------------------------------------------------------------------

def test_metrics_jsonl_is_record_plus_step_and_appends(tmp_path: Path) -> None:
    with make(tmp_path, "disabled") as t:
        t.log({"split": "train", "epoch": 0, "loss": 2.5, "lr": 0.1, "images_per_s": 900.0}, step=10)
        t.log({"split": "val", "epoch": 0, "top1": 0.5, "per_class_recall": [1.0, math.nan]}, step=10)
    with make(tmp_path, "disabled") as t:  # a resumed run appends
        t.log({"split": "train", "epoch": 1, "loss": math.nan, "data_wait": math.inf}, step=20)
    lines = read_lines(tmp_path)
    assert lines == [
        {"step": 10, "split": "train", "epoch": 0, "loss": 2.5, "lr": 0.1, "images_per_s": 900.0},
        {"step": 10, "split": "val", "epoch": 0, "top1": 0.5, "per_class_recall": [1.0, "nan"]},
        {"step": 20, "split": "train", "epoch": 1, "loss": "nan", "data_wait": "inf"},
    ]
    assert float(lines[2]["loss"]) != float(lines[2]["loss"])  # "nan" reads back as NaN
    assert not (tmp_path / RUN_ID_FILE).exists() and not (tmp_path / "wandb").exists()


def test_lines_are_on_disk_before_finish(tmp_path: Path) -> None:
    t = make(tmp_path, "disabled")
    t.log({"split": "train", "loss": 1.0}, step=1)
    assert read_lines(tmp_path) == [{"step": 1, "split": "train", "loss": 1.0}]  # a killed job keeps it
    t.finish()


def test_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # killed mid-write
    with make(tmp_path, "disabled") as t:
        t.log({"loss": 3.0}, step=3)
    assert (tmp_path / METRICS_FILE).read_text().splitlines()[-1] == '{"step": 3, "loss": 3.0}'


def test_jsonable_converts_numpy_and_torch_and_rejects_unknown() -> None:
    value = {"a": np.float32(0.5), "b": torch.tensor(2), "c": np.array([1.0, np.inf]), "d": (-math.inf,)}
    assert jsonable(value) == {"a": 0.5, "b": 2, "c": [1.0, "inf"], "d": ["-inf"]}
    with pytest.raises(TypeError):
        jsonable({"x": object()})


def test_record_may_not_carry_its_own_step(tmp_path: Path) -> None:
    with make(tmp_path, "disabled") as t, pytest.raises(ValueError, match="step"):
        t.log({"step": 3}, step=3)


def test_non_main_rank_touches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now raise
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for mode in ("offline", "online", "disabled"):
        t = make(run_dir, mode, is_main=False)
        t.log({"split": "train", "loss": 1.0}, step=1)
        t.summary({"best": 1.0})
        t.progress(1, 10, "x")
        t.finish(1)
        t.finish()
        assert t.run_id is None
    assert list(run_dir.iterdir()) == []
    assert not (tmp_path / "other").exists()
    make(tmp_path / "other", "offline", is_main=False).finish()  # does not even create its run_dir
    assert not (tmp_path / "other").exists()


def test_summary_merges_into_summary_json(tmp_path: Path) -> None:
    with make(tmp_path, "disabled") as t:
        t.summary({"best_top1": 0.5, "loss": math.nan})
        t.summary({"best_top1": 0.6})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best_top1": 0.6, "loss": "nan"}


def test_progress_logs_plain_lines_when_not_a_tty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    caplog.set_level(logging.INFO, logger="trainer.tracking.tracker")
    with make(tmp_path, "disabled") as t:
        for step in range(1, 11):
            t.progress(step, 10, "loss 1.0")
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.tracking.tracker"]
    # throttled, but the end always shows; each line carries its rate and ETA (trainer/runtime/progress.py)
    assert [m.split(" (")[0] for m in lines] == ["step 1/10", "step 10/10"]
    assert lines[0].endswith("eta ? loss 1.0") and "done in" in lines[1] and lines[1].endswith("loss 1.0")


def test_progress_draws_a_bar_on_a_tty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with make(tmp_path, "disabled") as t:
        for step in range(1, 11):
            t.progress(step, 10, "loss 1.0")
    assert "10/10" in capsys.readouterr().err


# W&B offline ------------------------------------------------------------------------------------------

def test_offline_run_is_written_and_resumed_with_the_same_id(tmp_path: Path) -> None:
    with make(tmp_path) as t:
        t.log({"split": "train", "loss": 1.0}, step=1)
        first = t.run_id
    assert first and (tmp_path / RUN_ID_FILE).read_text().strip() == first
    with make(tmp_path) as t:
        t.log({"split": "train", "loss": 0.5}, step=2)
        assert t.run_id == first
    # Two starts within one second: wandb names the second directory offline-run-<time>-<id>-1.
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first}*"))
    assert len(runs) == 2 and all((r / f"run-{first}.wandb").is_file() for r in runs)
    assert [line["step"] for line in read_lines(tmp_path)] == [1, 2]


def test_explicit_run_id_wins_and_is_persisted(tmp_path: Path) -> None:
    (tmp_path / RUN_ID_FILE).write_text("oldid123\n")
    with make(tmp_path, run_id="newid456") as t:
        assert t.run_id == "newid456"
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == "newid456"


def test_wandb_payload_prefixes_split_and_skips_lists() -> None:
    record = {"split": "val", "epoch": 2, "top1": 0.5, "per_class_recall": [0.1], "note": "x",
              "n": torch.tensor(7)}
    assert wandb_payload(record, 30) == {"global_step": 30, "val/epoch": 2, "val/top1": 0.5, "val/n": 7}


def test_init_failure_leaves_metrics_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no backend")

    monkeypatch.setattr(wandb, "init", boom)
    t = make(tmp_path)
    t.log({"split": "train", "loss": 1.0}, step=1)
    t.log({"split": "train", "loss": 0.9}, step=2)
    t.summary({"best": 1.0})
    t.finish(1)
    t.finish()
    assert [line["step"] for line in read_lines(tmp_path)] == [1, 2]
    warnings = tracker_warnings(caplog)
    assert len(warnings) == 1 and "init" in warnings[0].getMessage()


def test_log_and_finish_failures_leave_metrics_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(wandb.Run, "log", boom)
    t = make(tmp_path)
    for step in range(1, 4):
        t.log({"split": "train", "loss": 1.0 / step}, step=step)
    t.finish()
    assert [line["step"] for line in read_lines(tmp_path)] == [1, 2, 3]
    warnings = tracker_warnings(caplog)
    assert len(warnings) == 1 and "log" in warnings[0].getMessage()

    caplog.clear()
    monkeypatch.setattr(wandb.Run, "finish", boom)
    t = make(tmp_path / "second")
    t.finish(2)
    t.finish(2)
    assert len(tracker_warnings(caplog)) == 1


# secrets and provenance -------------------------------------------------------------------------------

def test_no_secret_reaches_any_file_in_the_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    argv = ["train.py", f"logger.api_token={ARGV_SECRET}", "--auth-token", FLAG_SECRET,
            f"data.url=https://user:{URL_SECRET}@example.org/shards", "optim.lr=0.1"]
    monkeypatch.setattr(sys, "argv", argv)
    config = {"optim": {"lr": 0.1}, "logger": {"api_key": CONFIG_SECRET, "project": "p"}}
    run_dir = tmp_path / "run"

    prov = provenance.write(run_dir, config, world_size=2, rank=0)
    with Tracker(run_dir, is_main=True, mode="offline", project="p", name="n", config=config) as t:
        for step in range(3):
            t.log({"split": "train", "loss": 1.0, "lr": 0.1}, step=step)
        t.summary({"best_top1": 0.5})

    record = json.loads(prov.read_text())
    assert record["env"]["SLURM_JOB_ID"] == "4242"  # the walk below is not vacuous
    assert record["env"]["SLURM_FAKE_PASSWORD"] == REDACTED
    assert f"logger.api_token={REDACTED}" in record["argv"]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    secrets = [*FAKE_SECRETS.values(), ARGV_SECRET, FLAG_SECRET, URL_SECRET, CONFIG_SECRET]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for path in files:
        data = path.read_bytes()
        leaked = [s for s in secrets if s.encode() in data]
        assert not leaked, f"{path.relative_to(run_dir)} contains {leaked}"


def test_redact_argv() -> None:
    argv = ["train.py", "foo.api_key=abc", "+logger.TOKEN=t", "--token", "abc", "--token=abc", "--password",
            "--verbose", "lr=0.1", "--name", "run1", "url=https://u:pw@host/x", "--auth-key"]
    assert redact_argv(argv) == [
        "train.py", f"foo.api_key={REDACTED}", f"+logger.TOKEN={REDACTED}", "--token", REDACTED,
        f"--token={REDACTED}", "--password", "--verbose", "lr=0.1", "--name", "run1",
        f"url=https://u:{REDACTED}@host/x", "--auth-key",
    ]


def test_redact_mapping() -> None:
    config = {
        "lr": 0.1,
        "logger": {"wandb_api_key": "k", "Secret_Thing": {"deep": 1}, "project": "p", "token": None},
        "services": [{"password": "pw", "host": "h"}, "plain"],
        "db": "postgres://me:pw@db/x",
    }
    assert redact_mapping(config) == {
        "lr": 0.1,
        "logger": {"wandb_api_key": REDACTED, "Secret_Thing": REDACTED, "project": "p", "token": None},
        "services": [{"password": REDACTED, "host": "h"}, "plain"],
        "db": f"postgres://me:{REDACTED}@db/x",
    }
    assert config["logger"]["wandb_api_key"] == "k"  # a copy, not in place


def test_provenance_record_and_one_file_per_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("UNRELATED_VAR", "not-recorded")
    cfg = OmegaConf.create({"a": 1, "b": "${a}", "token": "x"})
    first = provenance.write(tmp_path, cfg, world_size=2, rank=0)
    second = provenance.write(tmp_path, cfg, world_size=2, rank=0)
    assert first != second and first.parent == second.parent == tmp_path / "provenance"
    record = json.loads(first.read_text())
    assert record["env"]["SLURM_NTASKS"] == "2" and record["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert all(k.startswith("SLURM_") or k == "CUDA_VISIBLE_DEVICES" for k in record["env"])
    assert "UNRELATED_VAR" not in json.dumps(record)
    assert record["world_size"] == 2 and record["rank"] == 0
    assert record["packages"]["torch"] is not None and record["packages"]["omegaconf"] is not None
    git = record["git"]
    no_git = {"commit": None, "dirty": None}
    assert git == no_git or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))
    assert set(record["torch_cuda"]) == {"cuda", "cudnn", "gpus"}
    assert OmegaConf.load(tmp_path / "config.yaml") == {"a": 1, "b": 1, "token": REDACTED}
    assert not list(tmp_path.rglob(".*.tmp-*"))


def test_provenance_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git executable to be found
    path = provenance.write(tmp_path, {"a": 1}, world_size=1, rank=0)
    assert json.loads(path.read_text())["git"] == {"commit": None, "dirty": None}
