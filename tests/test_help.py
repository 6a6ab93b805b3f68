"""Each tool's `--help`: its own description and settings (default and comment from the schema), not
Hydra's dump of every training group; `--hydra-help` stays Hydra's."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.runtime.helptext import comments


def help_of(module: str, cwd: Path, flag: str = "--help") -> str:
    done = subprocess.run([sys.executable, "-m", module, flag], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def has_row(text: str, key: str, default: str, comment: str = "") -> bool:
    """`key = default` on one line, followed by the comment when one is given."""
    tail = rf"\s+# .*{re.escape(comment)}" if comment else ""
    return re.search(rf"^\s+{re.escape(key)} = {re.escape(default)}{tail}", text, re.M) is not None


def test_evaluate_help_lists_its_own_settings_only(tmp_path):
    text = help_of("launch.evaluate", tmp_path)
    assert text.startswith("`python -m launch.evaluate bag=DIR data.shards=DIR")
    assert has_row(text, "tta", "none", "none | hflip | fivecrop | tencrop: averaged over the views")
    assert has_row(text, "exclude_classes", "[]", "true classes left out of the summary")
    assert has_row(text, "data.shards", "???", "a folder written by shards.build")
    assert has_row(text, "logger.mode", "disabled")  # the nested factory's default, not LoggerConfig's
    assert "optim.base_lr" not in text and "Config groups" not in text
    assert list(tmp_path.iterdir()) == []  # help writes no Hydra output directory


def test_train_help_lists_settings_and_config_groups(tmp_path):
    text = help_of("launch.train", tmp_path, "-h")
    assert text.startswith("`python -m launch.train data.shards=DIR run_dir=DIR`")
    assert has_row(text, "loader.batch_size", "64", "per rank and per micro-step")
    assert has_row(text, "optim.base_lr", "0.1", "linear scaling rule")
    assert has_row(text, "launcher.signal", "USR2", "USR1 | USR2 | TERM")  # choices the comment omits
    assert has_row(text, "run_dir", "???", "an existing run there is resumed")
    assert re.search(r"^\s+model: resnet18, resnet50\s+# default: resnet50$", text, re.M)
    assert re.search(r"^\s+experiment: demo, imagenet_r50_8k\s+# default: none$", text, re.M)
    assert not re.search(r"\btta\b", text) and "exclude_classes" not in text and "bag.members" not in text


def test_shards_help_lists_every_source_schema(tmp_path):
    text = help_of("shards.build", tmp_path)
    assert re.search(r"^\s+source=csv:$", text, re.M) and re.search(r"^\s+source=imagefolder:$", text, re.M)
    assert has_row(text, "source.label_column", "label")
    assert has_row(text, "source.classes", "null", "pin the class list")  # the base class's comment
    assert has_row(text, "shard.maxsize", "1000000000", "bytes of encoded images per shard")


def test_hydra_help_is_left_to_hydra(tmp_path):
    assert "Hydra (" in help_of("shards.verify", tmp_path, "--hydra-help")


@dataclass
class Base:
    plain: int = 1
    noted: int = 2     # why noted
    # the line above says why
    above: str = "x"
    # a comment a blank line away belongs to nobody

    detached: bool = False


@dataclass
class Child(Base):
    noted: int = 3     # the subclass's own words win
    above: str = "y"   # (redeclared)
    plain: int = 4

    def method(self) -> None:
        x: int = 1  # a method's local is no field
        del x


@pytest.mark.parametrize(("cls", "expected"), [
    (Base, {"noted": "why noted", "above": "the line above says why"}),
    (Child, {"noted": "the subclass's own words win", "above": "(redeclared)"}),
])
def test_comments_come_from_the_dataclass_source(cls, expected):
    assert comments(cls) == expected
