"""The EcoTaxa round trip, end to end: an export with a type row, every status, NaN features, lineage
names and unreadable images -> shards with an unlabelled set -> a calibrated bag -> evaluation ->
an import file whose object_ids reconcile with the unlabelled objects.

`docs/ECOTAXA.md`'s step-by-step block runs as written (only its TRAIN line, the one the page says
to edit, is replaced by a tiny CPU recipe); `scripts/ecotaxa_trip.sh` runs locally and, with a stub
`sbatch` that records its arguments, shows the SLURM chain and its dependencies.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ecotaxa_export import CLASSES, write_export

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ("model.name=resnet18 data.crop_size=16 loader.batch_size=16 loader.workers=0 loader.pin_memory=false "
        "logger.mode=disabled trainer.epochs=3 schedule.warmup_epochs=0 trainer.log_every=50")
UNLABELLED = ("predicted", "dubious", "")


def doc_block() -> str:
    """The bash block under '## Step by step' in docs/ECOTAXA.md."""
    text = (REPO / "docs" / "ECOTAXA.md").read_text()
    section = text.split("## Step by step", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def run_bash(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=900)


def read_import(path: Path) -> tuple[list[str], list[str], list[dict]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        lines = list(csv.reader(fh, delimiter="\t"))
    return lines[0], lines[1], [dict(zip(lines[0], row)) for row in lines[2:]]


@pytest.fixture(scope="module")
def trip(tmp_path_factory):
    """The doc's steps on a generated export, with a bag of 2 tiny members."""
    root = tmp_path_factory.mktemp("trip")
    export = write_export(root / "export")
    script = doc_block().replace('TRAIN="bag.members=3"', f'TRAIN="bag.members=2 {TINY}"')
    assert script != doc_block(), "the TRAIN line of docs/ECOTAXA.md changed: update this test"
    done = run_bash(script, root)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return export, root / "work", done.stdout


def test_the_import_file_reconciles_with_the_unlabelled_objects(trip):
    export, work, stdout = trip
    header, types, rows = read_import(work / "ecotaxa_predictions.tsv")
    assert header[:3] == ["object_id", "object_annotation_category", "object_annotation_status"]
    assert all(t in ("[t]", "[f]") for t in types) and len(types) == len(header)
    unlabelled = export.ids(*UNLABELLED)
    unreadable = unlabelled & export.unreadable_ids()
    assert unreadable, "the export must hold unreadable unlabelled images"
    predicted = [r["object_id"] for r in rows]
    assert len(predicted) == len(set(predicted))
    assert set(predicted) == unlabelled - unreadable   # N = predicted + unreadable, exactly
    quarantined = {row["path"] for row in csv.DictReader((work / "shards" / "quarantine.tsv").open(),
                                                         delimiter="\t")}
    by_file = {r["img_file_name"]: r["object_id"] for r in export.rows}
    assert unreadable <= {by_file[p] for p in quarantined if p in by_file}
    assert {r["object_annotation_status"] for r in rows} == {"predicted"}
    assert {r["object_annotation_category"] for r in rows} <= set(CLASSES)
    assert {r["object_taxotrain_decision"] for r in rows} <= {"auto", "review"}
    assert all(0.0 <= float(r["object_taxotrain_score"]) <= 1.0 for r in rows)
    assert f"{len(unlabelled) - len(unreadable)} inputs = {len(predicted)} predicted + 0 unreadable" in stdout


def test_only_validated_objects_are_labelled_and_counts_reconcile(trip):
    export, work, _ = trip
    info = json.loads((work / "shards" / "_info.json").read_text())
    assert info["classes"] == sorted(CLASSES)  # lineage names stay class names
    labelled = sum(info["splits"][s]["num_samples"] for s in ("train", "val", "test"))
    validated = export.ids("validated")
    assert labelled == len(validated - export.unreadable_ids())
    assert info["splits"]["unlabelled"]["labelled"] is False
    readable = export.ids(*UNLABELLED) - export.unreadable_ids()
    assert info["splits"]["unlabelled"]["num_samples"] == len(readable)
    assert info["inputs"] == len(export.rows)  # the type row is not an input


def test_the_bag_is_calibrated_and_the_report_shows_acceptance(trip):
    _, work, _ = trip
    calibration = json.loads((work / "bag" / "calibration.json").read_text())
    assert set(calibration["members"]) == {"member-00", "member-01"}
    assert calibration["ensemble"] > 0 and calibration["split"] == "val"
    report = json.loads((work / "bag" / "report.json").read_text())
    assert report["calibration"]["applied"] is True
    models = report["calibration"]["models"]
    assert set(models) == {"member-00", "member-01", "ensemble"}
    assert all({"nll_before", "nll_after", "ece_before", "ece_after"} <= set(m) for m in models.values())
    accepted = report["acceptance"]["thresholds"]["ensemble"]
    assert 0.0 <= accepted["coverage"] <= 1.0 and accepted["target_precision"] == 0.95
    assert set(report["acceptance"]["coverage_at"]) == {"before", "after"}
    text = (work / "bag" / "report.md").read_text()
    assert "## Temperature scaling" in text and "## Automatic acceptance" in text
    assert (work / "bag" / "precision_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unlabelled_set_cannot_be_evaluated(trip):
    _, work, _ = trip
    done = subprocess.run([sys.executable, "-m", "launch.evaluate", f"bag={work / 'bag'}",
                           f"data.shards={work / 'shards'}", "data.split=unlabelled", f"out={work / 'x'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    said = done.stdout + done.stderr  # Hydra's logging sends the message to stdout
    assert "unlabelled set" in said and "data.split" in said
    assert not (work / "x").exists()


def test_uncalibrated_predictions_all_go_to_review_and_keep_the_object_id(trip):
    _, work, _ = trip
    out = work / "raw.parquet"
    done = subprocess.run([sys.executable, "-m", "launch.predict", f"bag={work / 'bag'}",
                           f"input={work / 'shards'}", "split=unlabelled", "calibration=none", f"out={out}",
                           "top_k=2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    assert {r["decision"] for r in table} == {"review"}
    assert all(r["object_id"].startswith("sample1_") for r in table)
    assert all(r["prob_1"] >= r["prob_2"] for r in table)


def test_the_script_chains_the_slurm_jobs_with_dependencies(tmp_path):
    log = tmp_path / "sbatch.log"
    stub = tmp_path / "sbatch"
    # a stand-in for sbatch --parsable: records the arguments, answers a new job id
    stub.write_text(f'#!/bin/bash\necho "$@" >> {log}\nwc -l < {log} | tr -d " "\n')
    stub.chmod(0o755)
    done = subprocess.run([REPO / "scripts" / "ecotaxa_trip.sh", tmp_path / "e.tsv", tmp_path / "w",
                           "--slurm", "trainer.epochs=5"],
                          env={**os.environ, "SBATCH": str(stub), "MEMBERS": "4"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert [c.split("slurm/")[1].split()[0] for c in calls] == [
        "shard.sbatch", "bag.sbatch", "calibrate.sbatch", "evaluate.sbatch", "predict.sbatch"]
    assert "--dependency=afterok:1" in calls[1] and "--array=0-3" in calls[1]
    assert "trainer.epochs=5" in calls[1]
    assert "--dependency=afterok:2" in calls[2]
    assert "--dependency=afterok:3" in calls[3] and "--dependency=afterok:3" in calls[4]
    assert "format=ecotaxa" in calls[4] and "split=unlabelled" in calls[4]


def test_features_of_the_unlabelled_set_and_an_export_with_the_calibration(trip):
    export, work, _ = trip
    done = subprocess.run([sys.executable, "-m", "launch.features", f"bag={work / 'bag'}",
                           f"data.shards={work / 'shards'}", "data.splits=[unlabelled]", "format=parquet",
                           f"out={work / 'features'}", "workers=0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    import pyarrow.parquet as pq

    table = pq.read_table(work / "features" / "features-unlabelled.parquet").to_pylist()
    assert len(table) == len(export.ids(*UNLABELLED) - export.unreadable_ids())
    assert {r["label"] for r in table} == {-1} and {r["class"] for r in table} == {None}
    done = subprocess.run([sys.executable, "-m", "launch.export", f"bag={work / 'bag'}",
                           f"out={work / 'export'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((work / "export" / "bag.json").read_text())
    calibration = json.loads((work / "bag" / "calibration.json").read_text())
    assert record["calibration"]["temperatures"] == calibration["members"]
    assert record["calibration"]["ensemble_temperature"] == calibration["ensemble"]
    assert set(record["calibration"]["thresholds"]) == {"member-00", "member-01", "ensemble"}
