"""Only the tools that train record early stop signals; every other tool keeps the default action of
SIGTERM, SIGUSR1 and SIGUSR2, so `scancel`, `timeout` and torchrun's teardown end it at once."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
