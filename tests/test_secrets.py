"""Secrets that reach a run inside strings (issue 14): a `launcher.setup` line `export WANDB_API_KEY=...`,
a URL password in `logger.name`, a secret environment variable's value anywhere in the config.

Before redaction by value, the setup line went verbatim into config.yaml, provenance, every checkpoint
and the W&B run; the URL password in logger.name reached the checkpoints and the W&B run files."""
from __future__ import annotations

import logging

import pytest
from test_train import UNEVEN, config
from train_fixtures import final_state, write_shardset

from trainer.loop import Trainer
from trainer.runtime.distributed import DistEnv
from trainer.tracking.provenance import REDACTED, redact_argv, redact_config, redact_mapping, redact_text

SETUP_SECRET = "abc123secret"       # in an assignment: found by the name WANDB_API_KEY
URL_SECRET = "urlpass99"            # a URL password
ENV_SECRET = "tok-value-7777-env"   # the value of MY_SERVICE_TOKEN, pasted into a setup line


pytestmark = pytest.mark.usefixtures("offline_wandb")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shardset(tmp_path_factory.mktemp("shards"), UNEVEN)


def test_no_secret_from_setup_or_logger_name_reaches_the_run_dir(shards, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MY_SERVICE_TOKEN", ENV_SECRET)
    run = tmp_path / "r"
    setup = f"[module load python,export WANDB_API_KEY={SETUP_SECRET},curl -H {ENV_SECRET} example.org]"
    cfg = config(shards, run, "trainer.max_steps=4", "loader.workers=0", "logger.mode=offline",
                 f"logger.name=https://me:{URL_SECRET}@example.org/run", f"launcher.setup={setup}")
    caplog.set_level(logging.WARNING)
    trainer = Trainer(cfg, DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "single"))
    try:
        # the run itself keeps the real values: the launcher reads cfg, only the records are redacted
        assert trainer.cfg.launcher.setup[1] == f"export WANDB_API_KEY={SETUP_SECRET}"
        assert trainer.config_dict["launcher"]["setup"][1] == f"export WANDB_API_KEY={REDACTED}"
        code = trainer.fit()
    finally:
        trainer.close()
    assert code == 0

    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.relative_to(run).as_posix() for p in files}
    assert {"config.yaml", "metrics.jsonl"} <= names  # the walk below is not vacuous
    assert any(n.startswith("provenance/start-") for n in names)
    assert any(n.startswith("checkpoints/step-") for n in names)
    assert any(n.startswith("wandb/offline-run-") and n.endswith(".wandb") for n in names)
    for path in files:
        data = path.read_bytes()
        leaked = [s for s in (SETUP_SECRET, URL_SECRET, ENV_SECRET) if s.encode() in data]
        assert not leaked, f"{path.relative_to(run)} contains {leaked}"
    assert final_state(run)["config"]["logger"]["name"] == f"https://me:{REDACTED}@example.org/run"

    warnings = [r.getMessage() for r in caplog.records
                if r.name == "trainer.tracking.provenance" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    keys = warnings[0].split(" held a secret")[0]
    assert set(keys.split(", ")) == {"launcher.setup[1]", "launcher.setup[2]", "logger.name"}
    assert "~/.netrc" in warnings[0]
    assert not any(s in warnings[0] for s in (SETUP_SECRET, URL_SECRET, ENV_SECRET))


def test_redact_text_by_value_assignment_and_url(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", ENV_SECRET)
    monkeypatch.setenv("db_password_file", "pw-from-env-1")  # *PASSWORD*, any case
    monkeypatch.setenv("SHORT_KEY", "12345")                 # too short to replace everywhere
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/ssh-agent.sock")  # not *_KEY/_TOKEN/_SECRET/PASSWORD
    assert redact_text(f"curl -H 'X: {ENV_SECRET}' url") == f"curl -H 'X: {REDACTED}' url"
    assert redact_text("login pw-from-env-1") == f"login {REDACTED}"
    assert redact_text("port 12345 /tmp/ssh-agent.sock") == "port 12345 /tmp/ssh-agent.sock"
    assert redact_text("export WANDB_API_KEY=k1; ml x") == f"export WANDB_API_KEY={REDACTED}; ml x"
    assert redact_text('HF_TOKEN="a b c" run') == f"HF_TOKEN={REDACTED} run"
    assert redact_text("export OMP_NUM_THREADS=8") == "export OMP_NUM_THREADS=8"
    assert redact_text("https://u:p@ss@host/x") == f"https://u:{REDACTED}@host/x"
    assert redact_text("https://host:8080/x?a=b@c") == "https://host:8080/x?a=b@c"


def test_value_redaction_reaches_mappings_argv_and_warns_by_key_only(monkeypatch, caplog):
    monkeypatch.setenv("MY_SERVICE_TOKEN", ENV_SECRET)
    config = {"launcher": {"setup": ["module load x", f"echo {ENV_SECRET}"]}, "lr": 0.1,
              "logger": {"name": "plain"}}
    assert redact_mapping(config)["launcher"]["setup"] == ["module load x", f"echo {REDACTED}"]
    assert redact_argv(["train.py", f"launcher.setup=[export A_SECRET={ENV_SECRET}]"]) == [
        "train.py", f"launcher.setup=[export A_SECRET={REDACTED}]"]
    caplog.set_level(logging.WARNING)
    assert redact_config(config, warn=False) == redact_mapping(config)
    assert caplog.records == []
    redact_config(config)
    [record] = caplog.records
    assert record.getMessage().startswith("launcher.setup[1] held a secret")
    assert ENV_SECRET not in record.getMessage()
