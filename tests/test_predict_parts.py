"""parts=true: predict and features stream each rank's rows into its own files; only counts cross ranks.

Predict: parts reconcile with the single-file output, array tasks then a merge, reruns skip finished
parts, a missing part is named, a killed writer leaves no complete part, two real ranks. Features: the
parts hold the single export's rows; pca is refused with parts.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_bag import bag_config
from train_fixtures import write_shardset

from trainer.inference import parts
from trainer.inference import predict as bag_predict
from trainer.inference.config import FeaturesConfig, PredictConfig
from trainer.inference.features import run as features_run
from trainer.inference.outputs import (
    PredictionRow,
    TableWriter,
    part_header,
    read_predictions,
    rows_batch,
    write_predictions,
)
from trainer.inference.predict import run
from trainer.jobs.bag import train_bag
from trainer.runtime import distributed
from trainer.runtime.cli import typed
from trainer.runtime.exits import ConfigError, exit_code

REPO = Path(__file__).resolve().parents[1]
TEST = [5, 4, 3, 2]          # four shards: two array tasks get two each
BAD = ("test", 1, 2)         # (split, shard, position) of the one undecodable sample


@pytest.fixture(scope="module", autouse=True)
def cpu_one_thread():
    # one thread: on tiny convolutions OpenMP's spinning threads cost ~20x on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "select_device", lambda _local_rank: torch.device("cpu"))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cpu_one_thread) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parts")
    shards = write_shardset(root / "s", {"train": [12, 12], "test": TEST}, corrupt={BAD[:2]: [BAD[2]]},
                            features=("area",))
    assert train_bag(bag_config(shards, root / "bag", "bag.members=2", "trainer.max_steps=2")) == 0
    return shards, root / "bag"


def predict_cfg(shards: Path, bag: Path, out: Path, **extra) -> PredictConfig:
    return typed(PredictConfig, {"bag": str(bag), "input": str(shards), "out": str(out), "workers": 0,
                                 "batch_size": 3, "top_k": 2, **extra})


def read_table(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="," if path.suffix == ".csv" else "\t"))


def by_key(rows: list[dict]) -> dict[str, dict]:
    found = {r["key"]: r for r in rows}
    assert len(found) == len(rows)  # no key twice
    return found


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory) -> Path:
    """Today's single-file output, the reference every parts layout must reproduce."""
    shards, bag = setup
    out = tmp_path_factory.mktemp("single") / "p.tsv"
    assert run(predict_cfg(shards, bag, out)) == 0
    return out


def test_parts_reconcile_and_merge_into_the_single_file(setup, single, tmp_path, capsys):
    import pyarrow.parquet as pq

    shards, bag = setup
    folder = tmp_path / "p"
    assert run(predict_cfg(shards, bag, folder, parts=True, merge_file=True)) == 0
    manifest = json.loads((folder / parts.MANIFEST).read_text())
    assert manifest["samples"] == sum(TEST) == manifest["inputs"]
    assert manifest["inputs"] == manifest["predicted"] + manifest["unreadable"]
    assert manifest["unreadable"] == 1
    assert [p["part"] for p in manifest["parts"]] == ["part-00000-00000"]
    for p in manifest["parts"]:
        assert p["inputs"] == p["predicted"] + p["unreadable"]
        assert pq.ParquetFile(folder / p["rows_file"]).metadata.num_rows == p["predicted"]
    # the merged file: the single file's rows (header and values), in part order
    merged, reference = read_table(folder / "predictions.tsv"), read_table(single)
    assert list(merged[0]) == list(reference[0]) == ["key", "path", "class_1", "prob_1", "class_2", "prob_2",
                                                     "decision"]
    assert by_key(merged) == by_key(reference)
    bad = read_table(folder / "predictions.unreadable.tsv")
    assert bad == read_table(single.with_name("p.unreadable.tsv")) and len(bad) == 1
    # the rows folder is one parquet dataset for folder readers
    assert pq.read_table(folder / parts.ROWS).num_rows == manifest["predicted"]
    printed = capsys.readouterr().out
    summary = f"{sum(TEST)} inputs = {sum(TEST) - 1} predicted + 1 unreadable in 1 part(s) of 1 task(s)"
    assert summary in printed


def test_array_tasks_then_merge_and_a_missing_task_is_named(setup, single, tmp_path):
    shards, bag = setup
    folder = tmp_path / "a"
    task = {"parts": True, "stage": "write", "task_count": 2}
    assert run(predict_cfg(shards, bag, folder, task_index=1, **task)) == 0
    merge = predict_cfg(shards, bag, folder, parts=True, stage="merge", task_count=2, merge_file=True)
    with pytest.raises(parts.PartsIncomplete, match="task 0 of 2: no part .*rerun array task 0") as err:
        run(merge)
    assert exit_code(err.value) == 1 and not (folder / parts.MANIFEST).exists()
    assert run(predict_cfg(shards, bag, folder, task_index=0, **task)) == 0
    assert run(merge) == 0
    manifest = json.loads((folder / parts.MANIFEST).read_text())
    assert [p["shards"] for p in manifest["parts"]] == [["test-000000.tar", "test-000002.tar"],
                                                        ["test-000001.tar", "test-000003.tar"]]
    assert [p["inputs"] for p in manifest["parts"]] == [TEST[0] + TEST[2], TEST[1] + TEST[3]]
    assert sum(p["unreadable"] for p in manifest["parts"]) == 1 == manifest["parts"][1]["unreadable"]
    assert by_key(read_table(folder / "predictions.tsv")) == by_key(read_table(single))


def test_rerun_skips_finished_parts_and_rewrites_changed_ones(setup, tmp_path, caplog):
    shards, bag = setup
    folder = tmp_path / "r"
    cfg = predict_cfg(shards, bag, folder, parts=True)
    assert run(cfg) == 0
    part = folder / parts.rows_file("part-00000-00000")
    first = part.stat().st_mtime_ns
    stale = folder / parts.ROWS / ".part-00000-00000.parquet.tmp-1-dead"  # what a SIGKILL leaves
    stale.write_bytes(b"half a parquet")
    caplog.set_level("INFO")
    assert run(cfg) == 0
    assert part.stat().st_mtime_ns == first and "part-00000-00000: finished before" in caplog.text
    assert stale.exists()  # a skipped part touches nothing
    assert run(predict_cfg(shards, bag, folder, parts=True, top_k=1)) == 0  # other settings: written again
    assert part.stat().st_mtime_ns != first and not stale.exists()
    record = json.loads((folder / "part-00000-00000.json").read_text())
    assert record["k"] == 1 and record["predicted"] + record["unreadable"] == sum(TEST)


def test_a_part_missing_from_the_manifest_is_named(setup, tmp_path):
    shards, bag = setup
    folder = tmp_path / "m"
    assert run(predict_cfg(shards, bag, folder, parts=True)) == 0
    (folder / parts.rows_file("part-00000-00000")).unlink()
    merge = predict_cfg(shards, bag, folder, parts=True, stage="merge")
    with pytest.raises(parts.PartsIncomplete, match=r"rows/part-00000-00000.parquet is missing"):
        run(merge)
    (folder / "part-00000-00000.json").unlink()
    with pytest.raises(parts.PartsIncomplete, match="no parts"):
        run(merge)


def test_a_failing_writer_publishes_no_part(setup, tmp_path):
    shards, bag = setup
    folder = tmp_path / "f"
    calls = []

    def failing(cfg, members):
        scoring = bag_predict.bag_scoring(cfg, members)

        def probabilities(batch):
            calls.append(len(batch.keys))
            if len(calls) == 2:
                raise OSError("disk went away")
            return scoring.probabilities(batch)

        return scoring._replace(probabilities=probabilities)

    with pytest.raises(OSError, match="disk went away"):
        run(predict_cfg(shards, bag, folder, parts=True), failing)
    assert calls and not list(folder.glob("part-*")) and not list((folder / parts.ROWS).iterdir())


KILLED = """
import os, signal, sys
from trainer.inference import predict
from trainer.runtime.cli import typed
from trainer.inference.config import PredictConfig
calls = []
def dying(cfg, members):
    scoring = predict.bag_scoring(cfg, members)
    def probabilities(batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return scoring.probabilities(batch)
    return scoring._replace(probabilities=probabilities)
predict.run(typed(PredictConfig, dict(bag=sys.argv[1], input=sys.argv[2], out=sys.argv[3], parts=True,
                                      workers=0, batch_size=2)), dying)
"""


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return env | {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def test_a_sigkilled_task_leaves_no_complete_part_and_the_rerun_completes_it(setup, tmp_path):
    shards, bag = setup
    folder = tmp_path / "k"
    done = subprocess.run([sys.executable, "-c", KILLED, str(bag), str(shards), str(folder)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert [p.name for p in (folder / parts.ROWS).iterdir() if not p.name.startswith(".")] == []
    assert list((folder / parts.ROWS).glob(".part-00000-00000.parquet.tmp-*"))  # the torn write, hidden
    assert not list(folder.glob("part-*.json"))
    merge = predict_cfg(shards, bag, folder, parts=True, stage="merge")
    with pytest.raises(parts.PartsIncomplete, match="no parts"):
        run(merge)
    assert run(predict_cfg(shards, bag, folder, parts=True)) == 0
    assert not list((folder / parts.ROWS).glob(".*"))  # the rerun removed its own temporary
    assert json.loads((folder / parts.MANIFEST).read_text())["inputs"] == sum(TEST)


def test_two_ranks_write_one_part_each_and_match_one_process(setup, single, tmp_path):
    shards, bag = setup
    folder = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "launch.predict", f"bag={bag}", f"input={shards}", f"out={folder}", "parts=true",
               "merge_file=true", "workers=0", "batch_size=3", "top_k=2", "dist_timeout_s=60"]
    done = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((folder / parts.MANIFEST).read_text())
    assert [p["part"] for p in manifest["parts"]] == ["part-00000-00000", "part-00000-00001"]
    assert all(p["predicted"] > 0 for p in manifest["parts"]) and manifest["inputs"] == sum(TEST)
    merged, reference = by_key(read_table(folder / "predictions.tsv")), by_key(read_table(single))
    assert merged.keys() == reference.keys()
    for key, row in merged.items():
        assert [row[f"class_{i}"] for i in (1, 2)] == [reference[key][f"class_{i}"] for i in (1, 2)]
        assert float(row["prob_1"]) == pytest.approx(float(reference[key]["prob_1"]), abs=2e-6)


@pytest.mark.parametrize(("setting", "key"), [
    ({"task_count": 2}, "task_count"), ({"stage": "merge"}, "stage"), ({"merge_file": True}, "merge_file"),
    ({"parts": True, "task_count": 2}, "task_count"), ({"parts": True, "task_index": 2, "task_count": 2},
                                                       "task_index"),
])
def test_bad_parts_settings_name_the_key(setup, tmp_path, setting, key):
    shards, bag = setup
    with pytest.raises(ConfigError, match=f"^{key}:"):
        typed(PredictConfig, {"bag": str(bag), "input": str(shards), **setting})


def test_parts_need_shards_and_a_folder(setup, tmp_path):
    shards, bag = setup
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError, match="^parts: needs shard input"):
        typed(PredictConfig, {"bag": str(bag), "input": str(tmp_path / "images"), "parts": True})
    (tmp_path / "p.tsv").write_text("")
    with pytest.raises(ConfigError, match="^out: parts=true: out is a folder"):
        typed(PredictConfig, {"bag": str(bag), "input": str(shards), "parts": True,
                              "out": str(tmp_path / "p.tsv")})


# ---------------------------------------------------------------- features


def features_cfg(shards: Path, bag: Path, out: Path, *overrides: str) -> FeaturesConfig:
    dots = [f"bag={bag}", f"data.shards={shards}", f"out={out}", "batch_size=3", "workers=0",
            "max_bad_fraction=0.5", "data.splits=[test]", *overrides]
    return typed(FeaturesConfig, OmegaConf.from_dotlist(dots))


def test_feature_parts_hold_the_single_exports_rows(setup, tmp_path):
    shards, bag = setup
    assert features_run(features_cfg(shards, bag, tmp_path / "one")) == 0
    assert features_run(features_cfg(shards, bag, tmp_path / "parts", "parts=true", "part_rows=4")) == 0
    record = json.loads((tmp_path / "parts" / "features.json").read_text())
    entry = record["splits"]["test"]
    assert entry["samples"] == sum(TEST) == entry["exported"] + entry["bad"] and entry["bad"] == 1
    assert len(entry["files"]) >= 3 and "file" not in entry  # 13 rows in files of about 4
    with np.load(tmp_path / "one" / "features-test.npz", allow_pickle=False) as z:
        single = {k: z[k] for k in z.files}
    loaded = []
    for name in entry["files"]:
        with np.load(tmp_path / "parts" / name, allow_pickle=False) as z:
            loaded.append({k: z[k] for k in z.files})
    keys = np.concatenate([p["keys"] for p in loaded])
    order = np.argsort(keys)
    assert keys[order].tolist() == single["keys"].tolist()
    for array in ("labels", "native", "probs", "emb/member-00", "emb/member-01"):
        np.testing.assert_allclose(np.concatenate([p[array] for p in loaded])[order], single[array],
                                   rtol=1e-5, atol=1e-6, err_msg=array)
    bad = read_table(tmp_path / "parts" / entry["bad_files"][0])
    assert [b["shard"] for b in bad] == ["test-000001.tar"]
    assert record["dims"] == {"member-00": 512, "member-01": 512}


def test_feature_parts_refuse_pca_naming_the_heads_own(setup, tmp_path):
    shards, bag = setup
    with pytest.raises(ConfigError, match=r"^pca: .*taxotrain-head pca=N"):
        features_cfg(shards, bag, tmp_path / "o", "parts=true", "pca=2")
    with pytest.raises(ConfigError, match="^part_rows:"):
        features_cfg(shards, bag, tmp_path / "o", "parts=true", "part_rows=0")


@pytest.mark.parametrize("fmt", ["tsv", "csv", "ecotaxa", "parquet"])
def test_the_streaming_writer_writes_what_the_whole_file_writer_writes(tmp_path, fmt):
    rows = [PredictionRow(f"k{i}", f"p/{i}.png", f"obj{i}", ("ant", "bee"), (0.75 - i / 100, 0.25),
                          "auto" if i % 2 else "review") for i in range(5)]
    whole, streamed = tmp_path / f"whole.{fmt}", tmp_path / f"streamed.{fmt}"
    write_predictions(whole, fmt, rows, 2, True)
    batch = rows_batch(rows, part_header(2)).to_pylist()
    with TableWriter(streamed, fmt, part_header(2)) as table:
        table.write(batch[:2])
        table.write(batch[2:])
    if fmt == "parquet":
        assert read_predictions(streamed, fmt) == read_predictions(whole, fmt)
    else:
        assert streamed.read_bytes() == whole.read_bytes()
    if fmt == "ecotaxa":  # a repeated object_id is refused and nothing is published
        with pytest.raises(ConfigError, match="appears twice"), TableWriter(tmp_path / "x.tsv", fmt, []) as t:
            t.write(batch + batch[:1])
        assert not (tmp_path / "x.tsv").exists()
