"""EcoTaxa exports and unlabelled sets: the type row, annotation statuses, the unlabelled set in the same
build, lineage class names, the class map, object ids, the `images` source; each fault of the table
exits 2 naming it."""
from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, run_build, save_image

from shards.config import CsvSource, ImageFolderSource, ImagesSource, ShardConfig, SplitConfig
from shards.info import read_info
from shards.plan import make_plan
from shards.sources import collect
from shards.verify import verify
from trainer.runtime.exits import EXIT_USAGE, ConfigError

NO_SPLIT = SplitConfig(val=0.0, test=0.0)
HEADER = ["img_file_name", "object_id", "object_annotation_category", "object_annotation_status",
          "object_annotation_hierarchy", "object_area", "object_major"]
TYPES = ["[t]", "[t]", "[t]", "[t]", "[t]", "[f]", "[f]"]
COPEPOD, DETRITUS, CALANUS = "Copepoda<Maxillopoda", "detritus<living", "Calanus<Calanidae"
# (object_id, category, status as exported, area, major); the image is images/<object_id>.png
OBJECTS = [
    ("v1", COPEPOD, "validated", "10", "2.5"),
    ("v2", COPEPOD, "V", "", "3"),                  # EcoTaxa's one-letter code, an empty feature
    ("v3", COPEPOD, "Validated", "NaN", ""),        # any case; NaN is an unmeasured feature too
    ("v4", DETRITUS, "validated", "4", "1"),
    ("v5", DETRITUS, "validated", "5", "1"),
    ("v6", CALANUS, "validated", "6", "1"),
    ("v7", CALANUS, "validated", "7", "1"),
    ("bad", DETRITUS, "validated", "8", "1"),       # garbage bytes: quarantined
    ("p1", COPEPOD, "predicted", "1", "1"),
    ("p2", DETRITUS, "PREDICTED", "1", "1"),
    ("p3", CALANUS, "P", "1", "1"),
    ("d1", DETRITUS, "dubious", "1", "1"),
    ("d2", COPEPOD, "D", "1", "1"),
    ("u1", "", "", "1", "1"),                       # unclassified: no status, no category
    ("u2", "", "", "", ""),
]
STATUS_OF = {"v": "validated", "b": "validated", "p": "predicted", "d": "dubious", "u": "unclassified"}


def write_tsv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def export_rows(objects=OBJECTS) -> list[list[str]]:
    return [TYPES] + [[f"images/{oid}.png", oid, cat, status, cat.replace("<", ">"), area, major]
                      for oid, cat, status, area, major in objects]


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """An EcoTaxa-like export: a TSV with its type row, and small PNGs (one of them garbage)."""
    folder = tmp_path / "export"
    for i, (oid, *_) in enumerate(OBJECTS):
        save_image(folder / "images" / f"{oid}.png", size=(8, 8), seed=i)
    (folder / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return write_tsv(folder / "ecotaxa_export.tsv", export_rows())


def ecotaxa(path: Path, **kw) -> CsvSource:
    """The settings of conf/source/ecotaxa.yaml."""
    preset = dict(path_column="img_file_name", label_column="object_annotation_category",
                  key_column="object_id", status_column="object_annotation_status", delimiter="tab",
                  feature_columns=["object_area", "object_major"])
    return CsvSource(path=str(path), **(preset | kw))


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard: key -> {ext: bytes}, with the shard's split under "split"."""
    found: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                found.setdefault(key, {"split": shard.name.rsplit("-", 1)[0].encode()})[ext] = \
                    tar.extractfile(m).read()
    return found


def tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def assert_statuses_reconcile(out: Path, info: dict) -> None:
    for status, n in info["statuses"].items():
        assert n["inputs"] == n["labelled"] + n["unlabelled"] + n["excluded"] + n["quarantined"], status
    assert sum(n["inputs"] for n in info["statuses"].values()) == info["inputs"]
    assert sum(n["quarantined"] for n in info["statuses"].values()) == info["quarantined"]
    assert sum(n["excluded"] for n in info["statuses"].values()) == info["excluded"]
    written = sum(s["num_samples"] for s in info["splits"].values())
    assert info["inputs"] == written + info["quarantined"] + info["excluded"]
    assert {r["status"]: {k: int(v) for k, v in r.items() if k != "status"}
            for r in tsv(out / "status_counts.tsv")} == info["statuses"]
    for row in tsv(out / "counts.tsv"):
        assert int(row["inputs"]) == int(row["written"]) + int(row["quarantined"]) + int(row["excluded"]), row


# ---------------------------------------------------------------- statuses and the unlabelled set


def test_only_validated_rows_are_labelled_and_the_rest_is_counted_per_status(export, tmp_path):
    out = tmp_path / "out"
    info = run_build(out, ecotaxa(export), split=NO_SPLIT, max_bad_fraction=0.2)

    assert_statuses_reconcile(out, info)
    assert info["inputs"] == len(OBJECTS)  # the type row is no input
    assert info["statuses"] == {
        "validated": {"inputs": 8, "labelled": 7, "unlabelled": 0, "excluded": 0, "quarantined": 1},
        "predicted": {"inputs": 3, "labelled": 0, "unlabelled": 0, "excluded": 3, "quarantined": 0},
        "dubious": {"inputs": 2, "labelled": 0, "unlabelled": 0, "excluded": 2, "quarantined": 0},
        "unclassified": {"inputs": 2, "labelled": 0, "unlabelled": 0, "excluded": 2, "quarantined": 0}}
    stored = samples(out)
    assert sorted(stored) == ["v1", "v2", "v3", "v4", "v5", "v6", "v7"]
    assert set(info["splits"]) == {"train", "val", "test"} and info["splits"]["train"]["labelled"] is True
    (bad,) = tsv(out / "quarantine.tsv")
    assert bad["path"] == "images/bad.png" and bad["status"] == "validated" and bad["class"] == DETRITUS
    assert not any("[t]" in r["path"] for r in tsv(out / "quarantine.tsv"))


def test_lineage_names_stay_class_names_end_to_end(export, tmp_path):
    out = tmp_path / "out"
    info = run_build(out, ecotaxa(export), split=NO_SPLIT, max_bad_fraction=0.2)

    assert info["classes"] == [CALANUS, COPEPOD, DETRITUS]
    assert (out / "classes.txt").read_text().splitlines() == info["classes"]
    assert read_info(out).classes == (CALANUS, COPEPOD, DETRITUS)
    meta = json.loads(samples(out)["v1"]["json"])
    assert meta["class"] == COPEPOD and meta["id"] == "v1" and meta["status"] == "validated"
    assert info["splits"]["train"]["class_counts"] == [2, 3, 2]
    assert verify(out) == []


def test_unlabelled_set_is_written_in_the_same_build_without_cls(export, tmp_path):
    out = tmp_path / "out"
    info = run_build(out, ecotaxa(export, unlabelled="unlabelled"), max_bad_fraction=0.2)

    assert_statuses_reconcile(out, info)
    assert info["excluded"] == 0
    assert info["statuses"]["predicted"] == {"inputs": 3, "labelled": 0, "unlabelled": 3, "excluded": 0,
                                             "quarantined": 0}
    assert info["statuses"]["unclassified"]["unlabelled"] == 2
    split = info["splits"]["unlabelled"]
    assert split["labelled"] is False and "class_counts" not in split and split["num_samples"] == 7
    assert split["filenames"] == ["unlabelled-000000.tar"]
    assert all("class_counts" in info["splits"][s] for s in ("train", "val", "test"))
    stored = samples(out)
    unlabelled = {k: s for k, s in stored.items() if s["split"] == b"unlabelled"}
    assert sorted(unlabelled) == ["d1", "d2", "p1", "p2", "p3", "u1", "u2"]
    for key, s in unlabelled.items():
        assert set(s) == {"split", "png", "json"}, key  # no .cls
        meta = json.loads(s["json"])
        assert meta["id"] == key and "class" not in meta and meta["status"] == STATUS_OF[key[0]]
        assert meta["path"] == f"images/{key}.png"
        assert set(meta["features"]) == {"object_area", "object_major"}
    assert json.loads(unlabelled["u2"]["json"])["features"] == {"object_area": None, "object_major": None}
    assert all("cls" in s for k, s in stored.items() if k not in unlabelled)
    shard_info = read_info(out)
    assert shard_info.splits["unlabelled"].labelled is False and shard_info.splits["train"].labelled
    unclassed = {r["split"]: r for r in tsv(out / "counts.tsv") if r["class"] == "-"}
    assert unclassed["unlabelled"]["written"] == "7"
    assert verify(out) == []


def test_excluded_rows_are_not_bad(export, tmp_path):
    # 1 of the 8 validated rows is bad (12.5%); counting the 7 excluded rows as bad would make it 8 of 15
    info = run_build(tmp_path / "out", ecotaxa(export), split=NO_SPLIT, max_bad_fraction=0.13)
    assert (info["quarantined"], info["excluded"]) == (1, 7)


def test_keep_status_aliases_and_a_detected_status_column(export, tmp_path, caplog):
    plain = CsvSource(path=str(export), path_column="img_file_name",
                      label_column="object_annotation_category", keep_status=["V", "predicted"])
    with caplog.at_level(logging.INFO):
        info = run_build(tmp_path / "out", plain, split=NO_SPLIT, max_bad_fraction=0.2)
    assert "object_annotation_status" in caplog.text
    assert info["statuses"]["predicted"]["labelled"] == 3 and info["statuses"]["dubious"]["excluded"] == 2


def test_the_unlabelled_layout_changes_the_plan_digests(export, tmp_path):
    def digests(**kw):
        cfg = ShardConfig(source=ecotaxa(export, **kw), out=str(tmp_path / "o"), split=NO_SPLIT)
        return {p.name: p.digest for p in make_plan(collect(cfg.source), cfg)}

    only = digests(unlabelled="unlabelled")
    more = digests(unlabelled="unlabelled", keep_status=["validated", "predicted"])
    assert set(only) == set(more) == {"train-000000.tar", "unlabelled-000000.tar"}
    assert only["train-000000.tar"] != more["train-000000.tar"]
    assert only["unlabelled-000000.tar"] != more["unlabelled-000000.tar"]


# ---------------------------------------------------------------- the class map


def test_class_map_regroups_chains_and_counts_tsv_shows_it(export, tmp_path):
    mapping = tmp_path / "map.csv"
    mapping.write_text(f"fine,coarse\n{CALANUS},Calanoida\nCalanoida,{COPEPOD}\n")
    out = tmp_path / "out"
    info = run_build(out, ecotaxa(export, class_map=str(mapping)), split=NO_SPLIT, max_bad_fraction=0.2)

    assert info["classes"] == [COPEPOD, DETRITUS]
    assert info["splits"]["train"]["class_counts"] == [5, 2]
    assert info["build"]["class_map"] == {CALANUS: COPEPOD, "Calanoida": COPEPOD}
    rows = {(r["split"], r["class"]): r for r in tsv(out / "counts.tsv")}
    assert rows[("train", COPEPOD)]["regrouped_from"] == f"{CALANUS}:2"
    assert rows[("train", DETRITUS)]["regrouped_from"] == ""
    assert json.loads(samples(out)["v6"]["json"])["class"] == COPEPOD


@pytest.mark.parametrize(("content", "named"), [
    (f"from,to\n{CALANUS},{COPEPOD}\n{COPEPOD},{CALANUS}\n", ["cycle", CALANUS, COPEPOD]),
    ("from\tto\na\tb\nb\tc\nc\ta\n", ["cycle", "a -> b -> c -> a"]),
    (f"from,to\nCyclopoida,{COPEPOD}\n", ["unknown class", "'Cyclopoida'", "line 2"]),
    (f"{CALANUS},{COPEPOD}\n", ["header", "from,to"]),
], ids=["cycle", "cycle-tsv", "unknown", "no-header"])
def test_class_map_faults_are_config_errors_naming_the_file(export, tmp_path, content, named):
    mapping = tmp_path / "map.csv"
    mapping.write_text(content)
    with pytest.raises(ConfigError) as err:
        run_build(tmp_path / "out", ecotaxa(export, class_map=str(mapping)))
    for text in ["source.class_map", str(mapping), *named]:
        assert text in str(err.value)
    assert not (tmp_path / "out" / "_info.json").exists()


def test_class_map_regroups_class_folders_too(tmp_path):
    root = tmp_path / "folders"
    for i, name in enumerate(["ant", "bee", "wasp", "wasp"]):
        save_image(root / name / f"{name}{i}.png", size=(8, 8), seed=i)
    mapping = tmp_path / "map.tsv"
    mapping.write_text("from\tto\nwasp\tbee\n")
    out = tmp_path / "out"
    info = run_build(out, ImageFolderSource(root=str(root), class_map=str(mapping)), split=NO_SPLIT)

    assert info["classes"] == ["ant", "bee"] and info["splits"]["train"]["class_counts"] == [1, 3]
    rows = {(r["split"], r["class"]): r["regrouped_from"] for r in tsv(out / "counts.tsv")}
    assert rows == {("train", "ant"): "", ("train", "bee"): "wasp:2"}
    assert info["statuses"] == {"-": {"inputs": 4, "labelled": 4, "unlabelled": 0, "excluded": 0,
                                      "quarantined": 0}}


def test_class_map_targets_must_be_in_a_pinned_class_list(export, tmp_path):
    mapping, classes = tmp_path / "map.csv", tmp_path / "classes.txt"
    mapping.write_text(f"from,to\n{CALANUS},Calanoida\n")
    classes.write_text(f"{COPEPOD}\n{DETRITUS}\n")
    with pytest.raises(ConfigError, match="Calanoida"):
        run_build(tmp_path / "out", ecotaxa(export, class_map=str(mapping), classes=str(classes)))


# ---------------------------------------------------------------- faults of the table: exit 2


def build_cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Exit code and output; the error line goes through Hydra's job logging (stdout), so both count."""
    done = subprocess.run([sys.executable, "-m", "shards.build", "source=ecotaxa", f"out={tmp_path / 'out'}",
                           *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_cli_ecotaxa_preset_builds_the_unlabelled_set(export, tmp_path):
    code, said = build_cli(tmp_path, f"source.path={export}", "source.unlabelled=unlabelled",
                           "max_bad_fraction=0.2")
    assert code == 0, said
    assert "15 inputs = 14 written + 1 quarantined" in said
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["unlabelled"]["num_samples"] == 7
    assert info["classes"] == [CALANUS, COPEPOD, DETRITUS]


def test_cli_status_column_not_in_the_table_exits_2(export, tmp_path):
    code, said = build_cli(tmp_path, f"source.path={export}", "source.status_column=status")
    assert code == EXIT_USAGE, said
    assert "source.status_column" in said and str(export) in said and "'status'" in said
    assert "object_annotation_status" in said  # the columns the table has


def test_cli_unknown_status_value_exits_2_naming_the_line(export, tmp_path):
    table = write_tsv(tmp_path / "odd.tsv", export_rows(OBJECTS[:3] + [("x1", COPEPOD, "approved", "", "")]))
    code, said = build_cli(tmp_path, f"source.path={table}")
    assert code == EXIT_USAGE, said
    assert f"{table}:6" in said and "'approved'" in said
    assert not (tmp_path / "out" / "_info.json").exists()


def test_unknown_keep_status_is_refused():
    with pytest.raises(ConfigError, match=r"source\.keep_status: .*'checked'"):
        CsvSource(path="x.tsv", keep_status=["validated", "checked"])


def test_malformed_type_row_names_the_line_and_the_odd_cells(export, tmp_path):
    rows = export_rows()
    rows[0] = ["[t]", "[t]", "taxon", "[t]", "[t]", "[f]", ""]
    table = write_tsv(tmp_path / "half.tsv", rows)
    with pytest.raises(ConfigError) as err:
        run_build(tmp_path / "out", ecotaxa(table))
    assert f"{table}:2" in str(err.value) and "type row" in str(err.value)
    assert "object_annotation_category='taxon'" in str(err.value) and "object_major=''" in str(err.value)


def test_duplicate_object_id_names_the_id_and_both_lines(export, tmp_path):
    objects = [*OBJECTS[:4], ("v2", DETRITUS, "predicted", "1", "1")]
    table = write_tsv(tmp_path / "dupe.tsv", export_rows(objects))
    with pytest.raises(ConfigError) as err:
        run_build(tmp_path / "out", ecotaxa(table))
    assert "'v2'" in str(err.value) and "lines 4 and 7" in str(err.value) and str(table) in str(err.value)


@pytest.mark.parametrize(("settings", "named"), [
    ({"label_column": None}, "source.unlabelled=unlabelled"),
    ({"unlabelled": "train"}, "source.unlabelled"),
    ({"unlabelled": "not/a name"}, "source.unlabelled"),
])
def test_impossible_unlabelled_settings_are_refused(settings, named):
    with pytest.raises(ConfigError, match=r"^source\.unlabelled: ") as err:
        CsvSource(path="x.csv", **settings)
    assert named in str(err.value)


# ---------------------------------------------------------------- unlabelled-only builds


def test_images_source_builds_one_unlabelled_set(tmp_path):
    root = tmp_path / "photos"
    save_image(root / "a.png", size=(8, 8), seed=1)
    save_image(root / "station 2" / "b.JPG", size=(8, 8), seed=2, fmt="JPEG")
    save_image(root / ".hidden.png", size=(8, 8), seed=3)
    (root / "notes.txt").write_text("not a picture")
    out = tmp_path / "out"
    info = run_build(out, ImagesSource(root=str(root)), max_bad_fraction=0.5)

    assert info["classes"] == [] and (out / "classes.txt").read_text() == ""
    assert (info["inputs"], info["quarantined"]) == (3, 1)
    assert info["statuses"] == {"-": {"inputs": 3, "labelled": 0, "unlabelled": 2, "excluded": 0,
                                      "quarantined": 1}}
    split = info["splits"]["unlabelled"]
    assert split["num_samples"] == 2 and split["labelled"] is False
    assert sum(s["num_samples"] for s in info["splits"].values()) == 2
    (row,) = tsv(out / "quarantine.tsv")
    assert row["path"] == "notes.txt" and row["reason"] == "not an image file"
    paths = sorted(json.loads(s["json"])["path"] for s in samples(out).values())
    assert paths == ["a.png", "station 2/b.JPG"]
    assert all("cls" not in s for s in samples(out).values())
    shard_info = read_info(out)
    assert shard_info.classes == () and shard_info.split("unlabelled").num_samples == 2
    assert verify(out) == []


def test_csv_without_labels_builds_an_unlabelled_set_with_a_pinned_class_list(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"g{i}.png", size=(8, 8), seed=i)
    (tmp_path / "meta.csv").write_text("path,area\ng0.png,1\ng1.png,2\ng2.png,\n")
    (tmp_path / "classes.txt").write_text("ant\nbee\n")
    src = CsvSource(path=str(tmp_path / "meta.csv"), label_column=None, unlabelled="todo",
                    feature_columns=["area"], classes=str(tmp_path / "classes.txt"))
    out = tmp_path / "out"
    info = run_build(out, src)

    assert info["classes"] == ["ant", "bee"] and info["empty_classes"] == []  # no labels were expected
    assert info["splits"]["todo"]["filenames"] == ["todo-000000.tar"]
    assert info["statuses"] == {"-": {"inputs": 3, "labelled": 0, "unlabelled": 3, "excluded": 0,
                                      "quarantined": 0}}
    assert all(set(s) == {"split", "png", "json"} for s in samples(out).values())
    assert verify(out) == []
