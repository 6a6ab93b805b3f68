"""An EcoTaxa-like export for the round-trip tests: the TSV as EcoTaxa writes it, and its images.

The table has EcoTaxa's column names and its type row (`[t]`/`[f]`), every annotation status (validated,
predicted, dubious, and unclassified: empty), empty (NaN) native features, lineage class names such as
`Copepoda<Maxillopoda`, and images that cannot be read (garbage bytes). Images are small PNGs whose
brightest channel encodes the class (tests/train_fixtures.py), so a tiny bag learns them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from train_fixtures import png

CLASSES = ("Acantharea<Radiozoa", "Copepoda<Maxillopoda", "detritus")
COLUMNS = ("img_file_name", "object_id", "object_annotation_category", "object_annotation_status",
           "object_annotation_hierarchy", "object_area", "object_major")
TYPES = ("[t]", "[t]", "[t]", "[t]", "[t]", "[f]", "[f]")


@dataclass
class Export:
    table: Path
    images: Path
    rows: list[dict[str, str]]

    def ids(self, *statuses: str) -> set[str]:
        return {r["object_id"] for r in self.rows if r["object_annotation_status"] in statuses}

    def unreadable_ids(self) -> set[str]:
        return {r["object_id"] for r in self.rows if r["img_file_name"].endswith("-bad.png")}


def write_export(root: Path, validated: int = 50, others: int = 6, bad_every: int = 29) -> Export:
    """`validated` validated objects per class, `others` predicted, dubious and unclassified ones per
    class; every `bad_every`-th image is garbage."""
    images = root  # beside the table, as in an EcoTaxa export with images
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    plan = [("validated", validated), ("predicted", others), ("dubious", others), ("", others)]
    serial = 0
    for status, count in plan:
        for label, name in enumerate(CLASSES):
            for _ in range(count):
                serial += 1
                bad = serial % bad_every == 0
                file = f"{serial:05d}{'-bad' if bad else ''}.png"
                (images / file).write_bytes(b"not a png at all" if bad else png(label, serial))
                # an unclassified object has no category in EcoTaxa; the others carry one
                category = name if status else ""
                rows.append({"img_file_name": file, "object_id": f"sample1_{serial:05d}",
                             "object_annotation_category": category, "object_annotation_status": status,
                             "object_annotation_hierarchy": category.replace("<", ">"),
                             "object_area": "" if serial % 5 == 0 else str(100 + serial),
                             "object_major": str(serial * 0.5)})
    table = root / "ecotaxa_export.tsv"
    with table.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerow(TYPES)
        writer.writerows([r[c] for c in COLUMNS] for r in rows)
    return Export(table, images, rows)
