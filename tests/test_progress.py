"""Progress and log files: the reporter (rate, ETA, end time) on a fake clock, the bar that lets log lines
through, `<tool>.log` (timestamps, warnings, results, appending), and two tools run as a batch job would."""
from __future__ import annotations

import datetime
import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from train_fixtures import write_shardset

from trainer.runtime import logfile
from trainer.runtime.progress import Progress, clock_text

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ")
ETA = re.compile(r"eta (\d+:\d\d:\d\d) \((\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\)")
WALL0 = datetime.datetime(2030, 1, 2, 3, 4, 5).timestamp()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL0 + self.t - 1000.0


def lines_of(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def reporter(clock: FakeClock, logger: str, **kw) -> Progress:
    return Progress("predict", kw.pop("total", 1000), every_s=kw.pop("every_s", 30.0), bar=False,
                    logger=logging.getLogger(logger), clock=clock, wall=clock.wall, **kw)


# ---------------------------------------------------------------- the reporter


def test_lines_are_throttled_and_carry_rate_eta_and_end_time(caplog):
    caplog.set_level(logging.INFO, logger="t.rate")
    clock = FakeClock()
    with reporter(clock, "t.rate") as seen:
        for _ in range(10):  # 100 items every 10 s: 10 per second, lines at most every 30 s
            clock.t += 10
            seen.advance(100, "loss 1.0")
    lines = lines_of(caplog, "t.rate")
    assert len(lines) == 4  # at 10 s, 40 s, 70 s, then the end, which always shows
    first = lines[0]
    assert first.startswith("predict 100/1,000 (10.0%) 10 img/s, eta 0:01:30 (")
    eta, end = ETA.search(first).groups()
    assert eta == clock_text(900 / 10)
    assert end == datetime.datetime.fromtimestamp(WALL0 + 10 + 90).isoformat(timespec="seconds")
    assert first.endswith(" loss 1.0")
    assert lines[-1].startswith("predict 1,000/1,000 (100.0%) 10 img/s, done in 0:01:40")


def test_close_reports_where_an_unfinished_run_stopped_once(caplog):
    caplog.set_level(logging.INFO, logger="t.stop")
    clock = FakeClock()
    seen = reporter(clock, "t.stop", every_s=1000.0)
    clock.t += 5
    seen.advance(10)
    clock.t += 5
    seen.advance(10)
    seen.close()
    seen.close()
    seen.advance(10)  # after close: ignored
    lines = lines_of(caplog, "t.stop")
    assert len(lines) == 2 and "stopped after 0:00:10" in lines[1] and lines[1].startswith("predict 20/1,000")


def test_rank_zero_estimates_all_ranks_and_never_passes_the_total(caplog):
    caplog.set_level(logging.INFO, logger="t.scale")
    clock = FakeClock()
    seen = reporter(clock, "t.scale", total=100, every_s=0.0, scale=4)
    clock.t += 2
    seen.advance(10)  # rank 0's 10 of its share: about 40 of all ranks'
    clock.t += 2
    seen.advance(16)
    seen.advance(0)  # a batch of nothing after the end: the end shows once
    seen.close()
    lines = lines_of(caplog, "t.scale")
    assert len(lines) == 2
    assert lines[0].startswith("predict ~40/100 (40.0%) 20 img/s, eta 0:00:03")
    assert lines[1].startswith("predict ~100/100 (100.0%)") and "done in 0:00:04" in lines[1]


def test_first_count_as_baseline_and_unknown_total(caplog):
    caplog.set_level(logging.INFO, logger="t.base")
    clock = FakeClock()
    seen = Progress("step", None, every_s=0.0, unit="step", start=None, logger=logging.getLogger("t.base"),
                    clock=clock, wall=clock.wall, bar=False)
    clock.t += 100  # start-up before the first count is not part of the rate
    seen.update(50)
    clock.t += 10
    seen.update(70)
    lines = lines_of(caplog, "t.base")
    assert lines == ["step 50 ? step/s, eta ?", "step 70 2 step/s, eta ?"]


def test_a_disabled_reporter_says_nothing(caplog):
    caplog.set_level(logging.INFO, logger="t.off")
    clock = FakeClock()
    with reporter(clock, "t.off", enabled=False) as seen:
        clock.t += 60
        seen.advance(1000)
    assert lines_of(caplog, "t.off") == []


def test_track_counts_each_item_and_closes_on_a_break(caplog):
    caplog.set_level(logging.INFO, logger="t.track")
    clock = FakeClock()
    seen = reporter(clock, "t.track", total=30, every_s=1e9)
    for batch in seen.track([[1] * 10, [2] * 10, [3] * 10], len):
        clock.t += 1
        if batch[0] == 2:
            break
    assert seen.closed and seen.count == 10  # the batch broken out of was not finished
    assert lines_of(caplog, "t.track")[-1].startswith("predict 10/30 (33.3%)")


def test_a_bar_lets_log_lines_through_above_it_and_restores_the_handlers(capsys):
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    before = list(root.handlers)
    try:
        seen = Progress("evaluate", 10, bar=True)
        seen.advance(3)
        logging.getLogger("t.bar").warning("validation line")
        seen.advance(7)
        seen.close()
        assert root.handlers == before
    finally:
        root.removeHandler(console)
    err = capsys.readouterr().err
    assert "\nvalidation line\n" in err.replace("\r", "\n")  # on a line of its own, not inside the bar
    assert "10/10" in err


# ---------------------------------------------------------------- the log file


def test_log_file_has_a_stamp_per_line_warnings_results_and_appends(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)  # the root logger at INFO, as Hydra sets it
    name = logging.getLogger("t.file")
    with pytest.warns(UserWarning, match="a python warning"):  # still shown the usual way
        with logfile.attach(tmp_path, "predict", main=True):
            name.info("first record")
            name.warning("two\nlines")
            warnings.warn("a python warning", UserWarning, stacklevel=1)
            logfile.echo("1 inputs = 1 predicted + 0 unreadable")
            name.debug("not at debug level")
    assert "1 inputs = 1 predicted" in capsys.readouterr().out  # the console still shows the result
    name.info("after detach")
    logfile.attach(tmp_path, "predict", main=True).close()  # a second start appends
    text = (tmp_path / "predict.log").read_text()
    lines = text.splitlines()
    assert all(STAMP.match(line) for line in lines), text
    assert sum("---- predict started: pid" in line for line in lines) == 2
    for wanted in ("INFO t.file: first record", "WARNING t.file: two", "a python warning",
                   "INFO taxotrain: 1 inputs = 1 predicted"):
        assert any(wanted in line for line in lines), (wanted, text)
    assert any(STAMP.sub("", line) == "lines" for line in lines)  # the second line of a record, stamped
    assert "not at debug level" not in text and "after detach" not in text


def test_only_the_main_rank_writes_and_a_torn_line_is_ended(tmp_path):
    assert logfile.attach(tmp_path / "rank1", "train", main=False) is None
    assert not (tmp_path / "rank1").exists()
    (tmp_path / "train.log").write_text("2030-01-01T00:00:00 INFO x: cut in the midd")
    with logfile.attach(tmp_path, "train", main=True):
        logging.getLogger("t.torn").warning("next")
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[0].endswith("cut in the midd") and "train started" in lines[1] and lines[2].endswith("next")


def test_a_second_folder_for_the_same_tool_ends_the_first(tmp_path):
    first = logfile.attach(tmp_path / "member-00", "train", main=True)
    second = logfile.attach(tmp_path / "member-01", "train", main=True)
    try:
        assert logfile.attach(tmp_path / "member-01", "train", main=True) is second
        logging.getLogger("t.members").warning("member one")
    finally:
        second.close()
        first.close()
    assert "member one" not in (tmp_path / "member-00" / "train.log").read_text()
    assert "member one" in (tmp_path / "member-01" / "train.log").read_text()


def test_console_lines_get_a_stamp_off_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    batch, terminal = io.StringIO(), Terminal()
    handlers = [logging.StreamHandler(batch), logging.StreamHandler(terminal)]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))  # as Hydra's `stdout` job logging
    root = logging.getLogger()
    kept, root.handlers = root.handlers, handlers  # pytest's own capture handlers stay untouched
    try:
        logfile.stamp_console()
        logging.getLogger("t.console").warning("hello")
    finally:
        root.handlers = kept
    assert STAMP.match(batch.getvalue()) and batch.getvalue().endswith(" hello\n")
    assert terminal.getvalue() == "hello\n"


# ---------------------------------------------------------------- the tools, as a batch job runs them


def batch_env() -> dict:
    launch = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launch}
    return env | {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def tool(module: str, *args: str) -> subprocess.CompletedProcess:
    """A tool with stdout and stderr in pipes, as in a SLURM job: no terminal."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=batch_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    """(shards, run_dir, stdout) of a 3-step training run in a batch job."""
    root = tmp_path_factory.mktemp("batch")
    shards = write_shardset(root / "shards", {"train": [12, 12]})
    run_dir = root / "run"
    done = tool("launch.train", f"data.shards={shards}", f"run_dir={run_dir}", "model.name=resnet18",
                "data.crop_size=16", "loader.batch_size=4", "loader.workers=0", "loader.pin_memory=false",
                "logger.mode=disabled", "trainer.max_steps=3", "trainer.log_every=1", "data.val_split=null",
                "schedule.warmup_epochs=0")
    return shards, run_dir, done.stdout


def test_training_lines_in_a_batch_job_carry_the_time_and_an_eta(trained):
    _, _, stdout = trained
    step_lines = [line for line in stdout.splitlines() if " step " in line and "/3 " in line]
    assert len(step_lines) == 3, stdout
    assert all(STAMP.match(line) for line in stdout.splitlines() if line.strip()), stdout
    assert "eta ?" in step_lines[0]  # the rate counts from the first step: none yet
    assert ETA.search(step_lines[1]) and "done in" in step_lines[2] and "loss" in step_lines[2]


def test_predict_writes_its_log_with_progress_and_the_result(trained, tmp_path):
    shards, run_dir, _ = trained
    out = tmp_path / "predicted" / "predictions.tsv"
    predict = tool("launch.predict", f"bag={run_dir}", f"input={shards}", "split=train", f"out={out}",
                   "workers=0", "batch_size=4", "progress_every_s=0.000001")
    assert "24 inputs = 24 predicted + 0 unreadable" in predict.stdout
    text = (out.parent / "predict.log").read_text()
    lines = text.splitlines()
    assert all(STAMP.match(line) for line in lines), text
    progress = [line for line in lines if " predict " in line and "/24 " in line]
    assert len(progress) == 6 and all(ETA.search(line) for line in progress[:-1]), text
    assert "done in" in progress[-1]
    assert any("24 inputs = 24 predicted + 0 unreadable" in line for line in lines)  # the result too


def test_a_warning_reaches_the_log_when_another_tool_is_still_attached(tmp_path):
    """Seen in the full suite: an in-process tool of an earlier test stays attached (until the process
    ends), then `pytest.warns` (a `catch_warnings` block) put the plain display back; the next attach did
    not hook again, so the warning missed the new log file."""
    logfile.attach(tmp_path / "a", "features", main=True)  # another tool, left attached
    with pytest.warns(UserWarning, match="while another tool"):
        with logfile.attach(tmp_path / "b", "evaluate", main=True):
            warnings.warn("while another tool is attached", UserWarning, stacklevel=1)
    assert "while another tool is attached" in (tmp_path / "b" / "evaluate.log").read_text()
