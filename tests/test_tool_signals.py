"""Only the tools that train record early stop signals; every other tool keeps the default action of
SIGTERM, SIGUSR1 and SIGUSR2, so `scancel`, `timeout` and torchrun's teardown end it at once."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bag import bag_config
from train_fixtures import write_shardset

from trainer.jobs.bag import train_bag

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import importlib, signal, sys
importlib.import_module(sys.argv[1])
print(" ".join("default" if signal.getsignal(s) == signal.SIG_DFL else "recorded"
               for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)))
"""


def handlers_after_import(module: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, module], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("module", ["launch.evaluate", "launch.predict", "launch.features", "launch.export",
                                    "shards.build", "shards.verify"])
def test_tools_that_do_not_train_keep_the_default_signal_actions(module):
    assert handlers_after_import(module) == "default default default"


@pytest.mark.parametrize("module", ["launch.train", "launch.bag", "launch.learning_curve"])
def test_training_tools_record_stop_signals_from_the_start(module):
    assert handlers_after_import(module) == "recorded recorded recorded"


def test_sigterm_ends_a_tool_that_does_not_train(tmp_path):
    """A process that has imported a tool ends on SIGTERM at once, with the signal's own status."""
    script = ("import signal, sys, time\nimport launch.predict  # noqa: F401\n"
              "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    assert proc.wait(timeout=10) == -15


@pytest.fixture(scope="module")
def bag(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny bag of one member, and shards with a test split large enough to keep a tool busy."""
    root = tmp_path_factory.mktemp("sigterm")
    shards = write_shardset(root / "s", {"train": [24, 24], "test": [600, 600, 600]})
    assert train_bag(bag_config(shards, root / "bag", "bag.members=1")) == 0
    return shards, root / "bag"


@pytest.mark.parametrize("tool", ["launch.evaluate", "launch.predict"])
def test_timeout_sigterm_ends_a_busy_tool_within_seconds(bag, tmp_path, tool):
    """`timeout -s TERM` (what scancel and torchrun's teardown send) ends the tool while it works."""
    shards, bag_dir = bag
    args = {"launch.evaluate": [f"data.shards={shards}", "data.check=off", f"out={tmp_path}/o"],
            "launch.predict": [f"input={shards}", f"out={tmp_path}/p.tsv"]}[tool]
    command = ["timeout", "-s", "TERM", "12", sys.executable, "-m", tool, f"bag={bag_dir}", "tta=tencrop",
               "batch_size=1", "workers=0", *args]
    start = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 124, done.stdout + done.stderr  # timeout's code: it had to send TERM
    assert elapsed < 12 + 5  # ended within seconds of the signal, not at the end of its work
    assert not (tmp_path / "o" / "report.json").exists() and not (tmp_path / "p.tsv").exists()


# an atexit call registered before the tool's own runs after it (last in, first out): it sees what a
# SLURM --signal meets while the interpreter shuts down, where CPython resets Python-handled signals to
# their default action (kill) but leaves ignored ones ignored
AT_EXIT = """
import atexit, importlib, signal, sys
atexit.register(lambda: print("ignored" if signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN else "other"))
importlib.import_module(sys.argv[1])
"""


@pytest.mark.parametrize("module", ["launch.train", "launch.evaluate"])
def test_a_training_tool_ignores_stop_signals_once_it_shuts_down(module):
    done = subprocess.run([sys.executable, "-c", AT_EXIT, module], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # a finished training is not killed by a late signal; other tools keep the default action throughout
    assert done.stdout.strip() == ("ignored" if module == "launch.train" else "other")
