"""trainer.inference.outputs: each format written then read back, and EcoTaxa's import layout."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.inference.outputs import (
    ECOTAXA_COLUMNS,
    FORMATS,
    PredictionRow,
    default_name,
    read_predictions,
    write_predictions,
)
from trainer.runtime.exits import ConfigError

K = 3
# an accented class and a comma in a path: what a TSV/CSV writer must quote or encode right
ROWS = [
    PredictionRow("s/0002", "imgs/b,2.png", "obj_2", ("copepoda", "détritus", "ant"), (0.7, 0.2, 0.1),
                  "auto"),
    PredictionRow("s/0001", "imgs/a1.png", "obj_1", ("ant", "copepoda", "détritus"),
                  (0.41234567, 0.4, 0.18765433), "review"),
    PredictionRow("s/0003", "imgs/c3.png", "obj_3", ("détritus", "ant", "copepoda"), (0.5, 0.25, 0.25),
                  "review"),
]


def expected(row: PredictionRow, with_id: bool, shards: bool) -> dict:
    head = {"object_id": row.object_id} if with_id else {}
    head |= {"key": row.key, "path": row.path} if shards else {"path": row.path}
    ranked = {}
    for i, (c, p) in enumerate(zip(row.classes, row.probs), start=1):
        ranked |= {f"class_{i}": c, f"prob_{i}": pytest.approx(p, abs=5e-7)}
    return {**head, **ranked, "decision": row.decision}


@pytest.mark.parametrize("fmt", ["tsv", "csv", "parquet"])
@pytest.mark.parametrize("shards", [True, False])
def test_table_formats_round_trip(tmp_path: Path, fmt: str, shards: bool) -> None:
    out = tmp_path / default_name(fmt)
    write_predictions(out, fmt, ROWS, K, shards)
    back = read_predictions(out, fmt)
    assert back == [expected(r, True, shards) for r in ROWS]  # same rows, same (given) order
    names = list(back[0])
    assert names[0] == "object_id" and names[-1] == "decision"
    assert [n for n in names if n.startswith("class_")] == ["class_1", "class_2", "class_3"]
    assert all(isinstance(r[f"prob_{i}"], float) for r in back for i in range(1, K + 1))


@pytest.mark.parametrize("fmt", ["tsv", "csv", "parquet"])
def test_no_object_id_column_without_ids(tmp_path: Path, fmt: str) -> None:
    rows = [PredictionRow(r.path, r.path, "", r.classes[:1], r.probs[:1], r.decision) for r in ROWS]
    out = tmp_path / default_name(fmt)
    write_predictions(out, fmt, rows, 1, shards=False)
    back = read_predictions(out, fmt)
    assert back == [expected(r, False, False) for r in rows]
    assert list(back[0]) == ["path", "class_1", "prob_1", "decision"]


def test_text_tables_keep_todays_layout(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    write_predictions(out, "csv", ROWS[1:2], K, shards=True)
    assert out.read_text(encoding="utf-8").splitlines() == [
        "object_id,key,path,class_1,prob_1,class_2,prob_2,class_3,prob_3,decision",
        "obj_1,s/0001,imgs/a1.png,ant,0.412346,copepoda,0.400000,détritus,0.187654,review"]
    tsv = tmp_path / "p.tsv"
    write_predictions(tsv, "tsv", ROWS[:1], K, shards=True)
    cells = tsv.read_text(encoding="utf-8").splitlines()[1].split("\t")
    assert cells[:4] == ["obj_2", "s/0002", "imgs/b,2.png", "copepoda"]


def test_parquet_types(tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    write_predictions(out, "parquet", ROWS, K, shards=True)
    table = pq.read_table(out)
    assert table.num_rows == len(ROWS)
    for i in range(1, K + 1):
        assert table.schema.field(f"prob_{i}").type == pa.float64()
        assert table.schema.field(f"class_{i}").type == pa.string()
    assert table.column("prob_1").to_pylist() == [0.7, 0.41234567, 0.5]  # not rounded: full float64
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]  # no temporary left behind


def test_ecotaxa_layout(tmp_path: Path) -> None:
    out = tmp_path / default_name("ecotaxa")
    write_predictions(out, "ecotaxa", ROWS, K, shards=True)
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # EcoTaxa reads latin-1 unless the file has a UTF-8 BOM
    lines = raw.decode("utf-8-sig").split("\n")
    assert lines[0] == ("object_id\tobject_annotation_category\tobject_annotation_status\t"
                        "object_taxotrain_score\tobject_taxotrain_decision")
    assert lines[1] == "[t]\t[t]\t[t]\t[f]\t[t]"
    numeric = {"object_taxotrain_score"}
    for name, cell in zip(lines[0].split("\t"), lines[1].split("\t")):
        assert cell == ("[f]" if name in numeric else "[t]")
    assert lines[2] == "obj_2\tcopepoda\tpredicted\t0.700000\tauto"
    assert len(lines) == 2 + len(ROWS) + 1 and lines[-1] == ""


def test_ecotaxa_round_trip(tmp_path: Path) -> None:
    out = tmp_path / default_name("ecotaxa")
    write_predictions(out, "ecotaxa", ROWS, K, shards=False)
    back = read_predictions(out, "ecotaxa")
    assert [list(r) for r in back] == [[name for name, _ in ECOTAXA_COLUMNS]] * len(ROWS)
    assert [r["object_id"] for r in back] == ["obj_2", "obj_1", "obj_3"]
    assert [r["object_annotation_category"] for r in back] == ["copepoda", "ant", "détritus"]
    assert {r["object_annotation_status"] for r in back} == {"predicted"}
    assert [r["object_taxotrain_score"] for r in back] == [0.7, 0.412346, 0.5]
    assert [r["object_taxotrain_decision"] for r in back] == ["auto", "review", "review"]


def test_ecotaxa_needs_every_object_id(tmp_path: Path) -> None:
    rows = [ROWS[0], PredictionRow("s/0009", "x.png", "", ("ant",) * K, (0.5, 0.3, 0.2), "auto"),
            PredictionRow("s/0010", "y.png", "", ("ant",) * K, (0.5, 0.3, 0.2), "auto")]
    out = tmp_path / default_name("ecotaxa")
    with pytest.raises(ConfigError, match=r"2 of 3 rows.*'s/0009'.*source\.key_column"):
        write_predictions(out, "ecotaxa", rows, K, shards=True)
    assert not out.exists()


def test_ecotaxa_refuses_duplicate_object_id(tmp_path: Path) -> None:
    twin = PredictionRow("s/0004", "d.png", "obj_1", ("ant",) * K, (0.5, 0.3, 0.2), "auto")
    out = tmp_path / default_name("ecotaxa")
    with pytest.raises(ConfigError, match=r"object_id 'obj_1' appears twice.*'s/0001'.*'s/0004'"):
        write_predictions(out, "ecotaxa", [*ROWS, twin], K, shards=True)
    assert not out.exists()


@pytest.mark.parametrize("name", ["cope\tpoda", "cope\npoda", "cope\rpoda"])
def test_ecotaxa_refuses_breaks_in_class_names(tmp_path: Path, name: str) -> None:
    row = PredictionRow("s/0005", "e.png", "obj_5", (name, "ant", "bee"), (0.5, 0.3, 0.2), "auto")
    with pytest.raises(ConfigError, match="class name"):
        write_predictions(tmp_path / "ecotaxa_p.tsv", "ecotaxa", [row], K, shards=True)


def test_unknown_format(tmp_path: Path) -> None:
    for call in (lambda: write_predictions(tmp_path / "p.xlsx", "xlsx", ROWS, K, True),
                 lambda: read_predictions(tmp_path / "p.xlsx", "xlsx"), lambda: default_name("xlsx")):
        with pytest.raises(ConfigError, match=r"format: unknown value 'xlsx'; allowed: tsv, csv, parquet, "
                                              r"ecotaxa"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_default_names() -> None:
    assert [default_name(f) for f in FORMATS] == ["predictions.tsv", "predictions.csv", "predictions.parquet",
                                                  "ecotaxa_predictions.tsv"]


def test_rows_must_match_k(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected k=2"):
        write_predictions(tmp_path / "p.tsv", "tsv", ROWS, 2, shards=True)
    with pytest.raises(ValueError, match="decision"):
        PredictionRow("k", "p", "", ("a",), (1.0,), "maybe")
