"""The versioned checkpoint record: round trip through the Checkpointer and weights_only, checkpoints from
before versioning, refusal of newer or incomplete ones, and a resume with another model or class list
that names both runs and exits 2 instead of tracing inside load_state_dict."""
from __future__ import annotations

import io
import logging
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_checkpoint import assert_same
from torch import nn
from train_fixtures import write_shardset

from trainer import rng, state
from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.config import TrainConfig
from trainer.jobs.run import run
from trainer.runtime.exits import EXIT_USAGE
from trainer.schedule import build_scheduler
from trainer.state import TrainingState

SOURCE = Path("/runs/r/checkpoints/step-000000007.pt")


def record(step: int = 7) -> TrainingState:
    """A small but real training state: SGD momentum after one step, a warmup-cosine schedule, RNG."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, "cosine", total_steps=10, warmup_steps=2, warmup_start_factor=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return TrainingState(
        model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=None,
        step=step, epoch=1, position={"world": 1, "workers": 1, "batches": 3, "offset": 3,
                                      "worker_batches": [[3]], "worker_consumed": [[12]]},
        rng=[rng.capture()], wandb_id="abc123", classes=("ant", "bee", "cat"),
        config={"model": {"name": "resnet18"}, "data": {"crop_size": 16}}, recipe={"lr": 0.1},
    )


def assert_same_record(a: TrainingState, b: TrainingState) -> None:
    for f in fields(TrainingState):
        assert_same(getattr(a, f.name), getattr(b, f.name), f.name)


def test_every_field_is_type_checked_on_read():
    assert set(state._TYPES) == {f.name for f in fields(TrainingState)}


def test_round_trip_through_checkpointer_and_weights_only(tmp_path):
    original = record()
    ck = Checkpointer(tmp_path / "ck")
    path = ck.save(original.to_dict(), original.step)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain containers and tensors only
    assert raw["format"] == "taxotrain-checkpoint" and raw["version"] == TrainingState.VERSION == 1
    assert raw["classes"] == ["ant", "bee", "cat"]  # a list, as checkpoints always held it
    assert_same_record(TrainingState.from_dict(raw, path), original)
    assert_same_record(TrainingState.read(path), original)
    latest = TrainingState.read_latest(ck)
    assert_same_record(latest, original)
    assert latest.model_name == "resnet18" and latest.classes == ("ant", "bee", "cat")
    assert TrainingState.read_latest(Checkpointer(tmp_path / "empty")) is None


def test_checkpoint_from_before_versioning_reads_as_version_0(tmp_path):
    old = record().to_dict()
    del old["format"], old["version"]  # what Trainer._save wrote before this record existed
    path = Checkpointer(tmp_path).save(old, 7)
    assert_same_record(TrainingState.read(path), record())


def test_newer_version_is_refused_naming_the_file():
    newer = {**record().to_dict(), "version": TrainingState.VERSION + 1}
    with pytest.raises(CheckpointError, match=rf"{SOURCE}.*version 2.*newer taxotrain.*up to 1"):
        TrainingState.from_dict(newer, SOURCE)


@pytest.mark.parametrize("bad", [{"format": "something-else"}, {"version": "1"}, {"version": -1},
                                 {"version": True}], ids=["format", "str", "negative", "bool"])
def test_other_format_or_malformed_version_is_refused(bad):
    with pytest.raises(CheckpointError, match=str(SOURCE)):
        TrainingState.from_dict({**record().to_dict(), **bad}, SOURCE)


@pytest.mark.parametrize("versioned", [True, False], ids=["v1", "v0"])
@pytest.mark.parametrize("missing", [f.name for f in fields(TrainingState)])
def test_missing_field_names_the_file_and_the_field(missing, versioned):
    d = record().to_dict()
    if not versioned:
        del d["format"], d["version"]
    del d[missing]
    with pytest.raises(CheckpointError, match=rf"{SOURCE}: field '{missing}' is missing"):
        TrainingState.from_dict(d, SOURCE)


@pytest.mark.parametrize("field, value, says", [
    ("step", "7", "'step' is a str"),
    ("step", True, "'step' is a bool"),
    ("classes", ["ant", 1], "'classes' holds non-string"),
    ("config", {"data": {}}, "no model.name"),
    ("model", [], "'model' is a list"),
])
def test_mistyped_field_names_the_file_and_the_field(field, value, says):
    with pytest.raises(CheckpointError, match=rf"{SOURCE}: .*{says}"):
        TrainingState.from_dict({**record().to_dict(), field: value}, SOURCE)


def test_check_resume_names_both_models_and_the_class_difference(tmp_path):
    held = record(step=12)
    held.check_resume("resnet18", ["ant", "bee", "cat"], tmp_path)  # the same run: fine
    with pytest.raises(CheckpointError, match=r"holds a resnet18 run \(step 12\); this command trains "
                                              r"resnet50: use another run_dir or model.name=resnet18"):
        held.check_resume("resnet50", ["ant", "bee", "cat"], tmp_path)
    with pytest.raises(CheckpointError, match=r"over 3 classes.*has 2: only in the checkpoint: \['cat'\]"):
        held.check_resume("resnet18", ["ant", "bee"], tmp_path)
    with pytest.raises(CheckpointError, match="another order"):
        held.check_resume("resnet18", ["bee", "ant", "cat"], tmp_path)


def test_record_is_frozen():
    with pytest.raises(AttributeError):
        record().step = 8  # type: ignore[misc]
    assert replace(record(), step=8).step == 8


# ---------------------------------------------------------------- resuming a run_dir in training

TINY = ["data.crop_size=16", "data.scale=[0.5,1.0]", "loader.batch_size=4", "loader.workers=0",
        "loader.pin_memory=false", "logger.mode=disabled", "data.val_split=null", "trainer.log_every=1"]


def config(run_dir: Path, *overrides: str) -> TrainConfig:
    dots = [f"run_dir={run_dir}", *TINY, *overrides]
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(dots))
    return OmegaConf.to_object(merged)


def test_resume_with_another_model_exits_2_naming_both(tmp_path, caplog):
    shards = write_shardset(tmp_path / "s", {"train": [8, 8]})
    run_dir = tmp_path / "r"
    first = config(run_dir, f"data.shards={shards}", "model.name=resnet18", "trainer.max_steps=2")
    assert run(first) == 0
    saved = TrainingState.read_latest(Checkpointer(run_dir / "checkpoints", is_main=False))
    assert saved.step == 2 and saved.model_name == "resnet18"
    other = config(run_dir, f"data.shards={shards}", "model.name=mobilenet_v3_small", "trainer.max_steps=4")
    with caplog.at_level(logging.ERROR):
        assert run(other) == EXIT_USAGE
    assert ("holds a resnet18 run (step 2); this command trains mobilenet_v3_small: use another run_dir "
            "or model.name=resnet18") in caplog.text
    assert "state_dict" not in caplog.text and "Traceback" not in caplog.text
    # the run directory is untouched and still continues with its own model
    assert TrainingState.read_latest(Checkpointer(run_dir / "checkpoints", is_main=False)).step == 2
    assert run(config(run_dir, f"data.shards={shards}", "model.name=resnet18", "trainer.max_steps=3")) == 0


def test_resume_with_another_class_list_exits_2(tmp_path, caplog):
    synthetic = ["loader.backend=synthetic", "data.shards=unused", "data.synthetic_samples=16",
                 "model.name=resnet18", "trainer.max_steps=2"]
    assert run(config(tmp_path / "r", *synthetic, "data.synthetic_classes=3")) == 0
    with caplog.at_level(logging.ERROR):
        assert run(config(tmp_path / "r", *synthetic, "data.synthetic_classes=4")) == EXIT_USAGE
    assert "holds a resnet18 run (step 2) over 3 classes; this command's data has 4" in caplog.text
    assert "only in the data: ['3']" in caplog.text


def test_weights_only_bytes_of_a_record(tmp_path):
    """to_dict holds nothing that weights_only refuses, also with an fp16 GradScaler's state."""
    scaler = torch.amp.GradScaler("cpu")
    buf = io.BytesIO()
    torch.save(replace(record(), scaler=scaler.state_dict()).to_dict(), buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert TrainingState.from_dict(loaded, tmp_path / "x.pt").scaler == scaler.state_dict()
