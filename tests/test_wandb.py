"""W&B as the dashboard of a bag: one group, readable names, job types, tags, per-class recall, the
evaluation's own resumable run with its tables and sample thumbnails, the export as an artifact.

Every run here is offline (tests/conftest.py's `offline_wandb`: a closed port, a private home). The
assertions read what `wandb sync` would upload: the records of each offline run's `.wandb` file, a
LevelDB-style log of `wandb_internal_pb2.Record` protobufs (wandb 0.31 has no Python reader left).
"""
from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bag import bag_config
from train_fixtures import CLASSES, write_shardset

from trainer.config import LoggerConfig, LoggerMode
from trainer.inference import wandb_report
from trainer.inference.config import EvalData, EvaluateConfig
from trainer.inference.evaluate import run as run_evaluate
from trainer.inference.export import export_bag
from trainer.jobs import bag as bag_job
from trainer.jobs.bag import train_bag
from trainer.runtime.exits import ConfigError
from trainer.tracking import identity
from trainer.tracking.tracker import RUN_ID_FILE, Tracker, per_class_payload

pytestmark = pytest.mark.usefixtures("offline_wandb")
BLOCK, HEADER = 32768, 7  # the .wandb file: a 7-byte file header, then 32 KiB blocks of chunks


def records(wandb_file: Path) -> list:
    """Every record of an offline run's `.wandb` file, in order (chunk header: crc32, length, type;
    types 1 full, 2 first, 3 middle, 4 last; a block's tail shorter than a header is padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, out, pending = wandb_file.read_bytes(), HEADER, [], b""
    assert data[:4] == b":W&B"
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def finished_records(wandb_file: Path, timeout_s: float = 60.0) -> list:
    """The records once the run's `exit` record is on disk: wandb 0.31's `finish()` returns before its
    service has flushed an offline run (measured: 7 bytes right after finish, complete ~1 s later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = records(wandb_file)
        if of_kind(found, "exit") or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def offline_runs(folder: Path) -> dict[Path, list]:
    return {f: finished_records(f) for f in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))}


def of_kind(recs: list, kind: str) -> list:
    return [getattr(r, kind) for r in recs if r.WhichOneof("record_type") == kind]


def history(recs: list) -> list[dict]:
    """Each logged row; a table or chart is a dict (`nrows`, `artifact_path`, ...) under its key."""
    rows = []
    for h in of_kind(recs, "history"):
        row: dict = {}
        for item in h.item:
            *path, last = list(item.nested_key) or [item.key]
            node = row
            for part in path:
                node = node.setdefault(part, {})
            node[last] = json.loads(item.value_json)
        rows.append(row)
    return rows


def run_record(recs: list):
    (run,) = of_kind(recs, "run")
    return run


# ---------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(("values", "key"), [({"tags": ["x" * 65]}, "logger.tags"),
                                             ({"project": "a/b"}, "logger.project"),
                                             ({"entity": ""}, "logger.entity"),
                                             ({"group": "g" * 129}, "logger.group"),
                                             ({"class_scalars": -1}, "logger.class_scalars")])
def test_logger_values_w_and_b_would_refuse_fail_at_start_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        LoggerConfig(**values)


def test_tags_keep_first_occurrences_and_fit_w_and_b():
    assert identity.tags("demo", None, ["resnet18", "demo", ""], "t" * 70) == ("demo", "resnet18", "t" * 64)


# ---------------------------------------------------------------------------------------- tracker


def test_tracker_sends_group_job_type_tags_entity_and_keeps_secrets_out(tmp_path, monkeypatch):
    secret = "taxotrain-fake-secret-group"
    monkeypatch.setenv("MY_API_TOKEN", secret)
    with Tracker(tmp_path, is_main=True, mode="offline", project="p", name="bag/member-01", config={},
                 entity="team", group=f"bag-{secret}", job_type="train", tags=("demo", "resnet18")) as t:
        t.log({"split": "train", "loss": 1.0}, step=1)
    (recs,) = offline_runs(tmp_path).values()
    run = run_record(recs)
    assert (run.entity, run.project, run.job_type) == ("team", "p", "train")
    assert run.display_name == "bag/member-01"
    assert run.run_group == "bag-<redacted>" and list(run.tags) == ["demo", "resnet18"]
    assert not any(secret.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_per_class_recall_is_one_scalar_per_class_up_to_the_limit_then_a_table(tmp_path):
    classes = ["ant", "bee/wasp", "bee.wasp"]  # cleaned to the same key: kept apart by index
    payload = per_class_payload("val/recall", classes, [0.5, 1.0, math.nan])
    assert list(payload) == ["val/recall/ant", "val/recall/bee_wasp", "val/recall/bee_wasp-2"]
    assert payload["val/recall/ant"] == 0.5 and math.isnan(payload["val/recall/bee_wasp-2"])
    for limit, folder in ((3, tmp_path / "scalars"), (2, tmp_path / "table")):
        with Tracker(folder, is_main=True, mode="offline", project="p", name="n", config={},
                     class_scalars=limit) as t:
            t.per_class("val/recall", classes, [0.5, 1.0, math.nan], step=7)
        (recs,) = offline_runs(folder).values()
        (row,) = history(recs)
        assert row["global_step"] == 7
        if limit == 3:
            assert row["val/recall/ant"] == 0.5 and row["val/recall/bee_wasp"] == 1.0
        else:
            assert "val/recall/ant" not in row and row["val/recall"]["nrows"] == 3  # a table


def test_a_failing_payload_turns_w_and_b_off_once_and_metrics_go_on(tmp_path, caplog):
    with Tracker(tmp_path, is_main=True, mode="offline", project="p", name="n", config={}) as t:
        t.log_wandb(lambda wandb: 1 / 0, step=1)
        t.log_wandb(lambda wandb: {"x": 1}, step=2)  # W&B is off: not even built
        t.log({"split": "train", "loss": 1.0}, step=3)
    warnings = [r for r in caplog.records if "W&B log failed" in r.getMessage()]
    assert len(warnings) == 1
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


# ---------------------------------------------------------------------------------------- samples


def test_sample_collector_keeps_the_most_confident_errors_and_least_confident_correct():
    collector = wandb_report.SampleCollector(per_kind=2, size=8)
    labels = torch.tensor([0, 0, 1, 1, 2])
    # confidence of the prediction: 0.9 wrong, 0.6 wrong, 0.5 right, 0.8 right, 0.7 wrong
    probs = torch.tensor([[0.05, 0.9, 0.05], [0.2, 0.6, 0.2], [0.25, 0.5, 0.25], [0.1, 0.8, 0.1],
                          [0.7, 0.2, 0.1]])
    images = torch.randint(0, 256, (5, 3, 16, 12), dtype=torch.uint8)
    collector.update(probs, labels, images, ("a", "b", "c", "d", "e"))
    assert [s.key for s in collector.errors] == ["a", "e"]
    assert [s.key for s in collector.unsure] == ["c", "d"]
    assert collector.errors[0].thumb.shape == (8, 6, 3) and collector.errors[0].thumb.dtype == np.uint8
    assert collector.errors[0].p_true == pytest.approx(0.05)
    # a later batch: a more confident error displaces "e", a surer correct answer changes nothing
    collector.update(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.99, 0.01]]), torch.tensor([0, 1]),
                     images[:2], ("f", "g"))
    assert [s.key for s in collector.errors] == ["f", "a"] and [s.key for s in collector.unsure] == ["c", "d"]
    collector.merge_ranks()  # one process: its own candidates
    assert len(collector.errors) == 2


# ---------------------------------------------------------------------------------------- a bag


@pytest.fixture(scope="module")
def wandb_bag(tmp_path_factory):
    """A bag of two members trained with W&B offline, validated once each."""
    root = tmp_path_factory.mktemp("wandb")
    shards = write_shardset(root / "s", {"train": [40, 40, 40], "val": [12], "test": [20, 13]})
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                            "WANDB_BASE_URL": "http://127.0.0.1:9"}.items():
            mp.setenv(name, value)
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / "home" / var.lower()))
        mp.delenv("WANDB_API_KEY", raising=False)
        cfg = bag_config(shards, root / "plankton", "bag.members=2", "logger.mode=offline",
                         "data.val_split=val", "logger.tags=[site-a]", "bag.calibrate=false")
        assert train_bag(cfg) == 0
    return shards, root / "plankton"


def test_the_members_of_a_bag_share_one_group_with_readable_names(wandb_bag):
    _, bag = wandb_bag
    runs = [run_record(recs) for member in ("member-00", "member-01")
            for recs in offline_runs(bag / member).values()]
    assert [r.display_name for r in runs] == ["plankton/member-00", "plankton/member-01"]
    assert {r.run_group for r in runs} == {"plankton"} and {r.job_type for r in runs} == {"train"}
    assert all(set(r.tags) == {"site-a", "resnet18"} for r in runs)
    assert runs[0].run_id == (bag / "member-00" / RUN_ID_FILE).read_text().strip()


def test_training_logs_lr_loss_topk_throughput_and_recall_per_class(wandb_bag):
    _, bag = wandb_bag
    (recs,) = offline_runs(bag / "member-00").values()
    rows = history(recs)
    train = next(r for r in rows if "train/loss" in r)
    assert {"train/lr", "train/top1", "train/top5", "train/images_per_s", "train/data_wait"} <= set(train)
    val = next(r for r in rows if "val/top1" in r)
    recall = next(r for r in rows if "val/recall/ant" in r)  # its own row, at the same x
    jsonl = [json.loads(line) for line in (bag / "member-00" / "metrics.jsonl").read_text().splitlines()]
    expected = next(r for r in jsonl if r["split"] == "val")
    assert [recall[f"val/recall/{c}"] for c in CLASSES] == pytest.approx(
        [float(v) for v in expected["per_class_recall"]])
    assert val["global_step"] == recall["global_step"] == expected["step"]


def test_member_names_follow_logger_name_and_the_experiment_becomes_a_tag(wandb_bag, monkeypatch):
    shards, bag = wandb_bag
    monkeypatch.setattr(identity, "hydra_choice", lambda group: "demo" if group == "experiment" else None)
    cfg = bag_config(shards, bag, "bag.members=2", "logger.name=trial", "logger.group=study")
    member = bag_job.member_config(cfg, 1)
    assert (member.logger.group, member.logger.name, member.logger.tags) == ("study", "trial/member-01",
                                                                             ["demo"])


def evaluation(shards: Path, bag: Path, out: Path, **kw) -> EvaluateConfig:
    cfg = EvaluateConfig(bag=str(bag), data=EvalData(str(shards), kw.pop("split", "test")), workers=0,
                         batch_size=8, out=str(out), **kw)
    cfg.logger = replace(cfg.logger, mode=LoggerMode.offline)
    return cfg


def test_an_evaluation_is_a_run_of_the_bag_group_with_tables_charts_and_samples(wandb_bag, tmp_path):
    shards, bag = wandb_bag
    assert run_evaluate(evaluation(shards, bag, tmp_path)) == 0
    (recs,) = offline_runs(tmp_path).values()
    run = run_record(recs)
    assert (run.run_group, run.job_type) == ("plankton", "evaluate")
    assert run.display_name == "plankton/evaluate-test"
    assert set(run.tags) == {"site-a", "resnet18"}
    assert not (tmp_path / RUN_ID_FILE).exists()  # derived from the settings, never kept in the folder
    (row,) = history(recs)
    for key in ("summary", "per_class", "samples", "reliability_bins", "confusion_matrix_table",
                "precision_coverage_curve_table", "confusion", "reliability", "precision_coverage"):
        assert key in row, key
    report = json.loads((tmp_path / "report.json").read_text())
    errors = report["ensemble"]["n"] - round(report["ensemble"]["top1"] * report["ensemble"]["n"])
    expected = min(errors, wandb_report.SAMPLES_PER_KIND) + min(report["ensemble"]["n"] - errors,
                                                                wandb_report.SAMPLES_PER_KIND)
    assert row["samples"]["nrows"] == expected
    assert row["per_class"]["nrows"] == len(CLASSES)
    tables = {a.name: a for a in of_kind(recs, "artifact") if a.type == "run_table"}
    samples = next(a for name, a in tables.items() if name.endswith("-samples"))
    assert sum(c.path.endswith(".png") for c in samples.manifest.contents) >= 1  # the thumbnails


def test_a_rerun_resumes_its_evaluation_and_another_split_is_another_run(wandb_bag, tmp_path):
    shards, bag = wandb_bag
    test = evaluation(shards, bag, tmp_path, plots=False)
    assert run_evaluate(test) == 0
    assert run_evaluate(test) == 0
    assert run_evaluate(evaluation(shards, bag, tmp_path, split="val", plots=False)) == 0
    runs = [run_record(recs) for recs in offline_runs(tmp_path).values()]
    # by name, not by folder order: offline-run-<time> has whole seconds, and two runs of one second
    # sort by their ids
    by_name = {n: [r.run_id for r in runs if r.display_name == n] for n in {r.display_name for r in runs}}
    tests, vals = by_name.pop("plankton/evaluate-test"), by_name.pop("plankton/evaluate-val")
    assert not by_name and len(tests) == 2 and len(vals) == 1
    assert tests[0] == tests[1] != vals[0]
    ids = [tests[0], vals[0]]
    # settings that change no number keep the id; those that change numbers or the folder do not
    same = wandb_report.evaluation_id(replace(test, workers=2, batch_size=3, plots=True))
    others = {wandb_report.evaluation_id(c) for c in (replace(test, tta="hflip"), replace(test, out=str(bag)),
                                                      replace(test, exclude_classes=["bee"]))}
    assert same == ids[0] and len(others) == 3 and not others & set(ids)


def test_disabled_logger_collects_nothing_and_writes_no_w_and_b(wandb_bag, tmp_path, monkeypatch):
    shards, bag = wandb_bag

    def forbidden(*args, **kwargs):
        raise AssertionError("collected although W&B is off")

    monkeypatch.setattr(wandb_report.SampleCollector, "update", forbidden)
    cfg = evaluation(shards, bag, tmp_path, plots=False)
    cfg.logger = replace(cfg.logger, mode=LoggerMode.disabled)
    assert run_evaluate(cfg) == 0
    assert not (tmp_path / "wandb").exists() and (tmp_path / "report.json").is_file()


def test_an_export_becomes_a_model_artifact_of_the_bag_group(wandb_bag, tmp_path):
    _, bag = wandb_bag
    out, metas = export_bag(bag, [], "latest", tmp_path / "export")
    wandb_report.log_export(bag, out, metas, LoggerConfig(mode=LoggerMode.offline))
    runs = [recs for recs in offline_runs(bag).values()
            if run_record(recs).job_type == "export"]
    assert len(runs) == 1
    run = run_record(runs[0])
    assert (run.run_group, run.display_name) == ("plankton", "plankton/export")
    (artifact,) = [a for a in of_kind(runs[0], "artifact") if a.type == "model"]
    assert artifact.name == "plankton-export"
    assert sorted(c.path for c in artifact.manifest.contents) == sorted(p.name for p in out.iterdir())
    assert [m["name"] for m in json.loads(artifact.metadata)["members"]] == ["member-00", "member-01"]
    assert not (out / "wandb").exists() and not (out / "metrics.jsonl").exists()  # the export stays clean
