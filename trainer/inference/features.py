"""Export a bag's penultimate embeddings, per split, next to the native features.

For a random forest on native (instrument-measured) plus deep features, as EcoTaxa classifies: each
sample's key, label, class, source path and native features (the `.json` member written by
shards.build; NaN where unmeasured), next to each member's embedding (the input of its last Linear
layer, averaged over the TTA views) and the ensemble's mean probabilities. `mode=concat` puts the
members side by side in one array. An unlabelled set (`shards.build source.unlabelled=NAME`) is
exported too: its labels are -1 and its class empty. `pca=N` projects with a PCA fitted on the first
split listed only (normally train) and applied to every split, so nothing of val/test shapes it.

Writes `features-<split>.npz` (or `.parquet`), `pca.npz` and last `features.json` into `<bag>/features`
(or `out=DIR`), each atomically. Rows are sorted by key, so a rerun writes the same bytes. Runs
in-process, under torchrun or as srun tasks: each rank embeds its own shards, rank 0 gathers and writes.
No object arrays: `np.load(path, allow_pickle=False)` opens every npz written here.

`parts=true` gathers nothing: each rank writes its rows of a split as `features-<split>/part-<rank>-<i>`
files of about `part_rows` rows (sorted by key inside a file, not across files), its bad samples as
`bad-<rank>.tsv`, and only counts cross ranks; features.json lists the files (`"files"` instead of
`"file"`). Memory holds one file's rows. No `pca`: it needs every row of the first split in one place.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shards.info import read_info
from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.shardset import ShardSet
from trainer.inference import members as bag_members
from trainer.inference.config import FeaturesConfig
from trainer.inference.ensemble import combine
from trainer.inference.members import Member, embeddings, load_bag
from trainer.runtime import distributed, lock, logfile, progress
from trainer.runtime.exits import ConfigError, RunFailure
from trainer.runtime.files import atomic_path, atomic_write

log = logging.getLogger(__name__)
MODES = ("per_member", "concat")
FORMATS = ("npz", "parquet")
CONCAT = "ensemble"  # the array name of the members side by side (`emb/ensemble`, columns `emb.<i>`)
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: a rerun writes the same bytes




# ---------------------------------------------------------------- rows


@dataclass
class Rows:
    """Exported samples of one split: one batch's, one rank's, or (gathered on rank 0) all of them."""

    keys: np.ndarray              # str [N]
    labels: np.ndarray            # int64 [N]
    paths: np.ndarray             # str [N], the source path recorded in the sample's .json
    native: np.ndarray            # float32 [N, F], NaN where unmeasured
    emb: dict[str, np.ndarray]    # float32 [N, D] per member (or CONCAT)
    probs: np.ndarray             # float32 [N, C], the members' mean
    bad: list[data.BadRecord] = field(default_factory=list)

    @classmethod
    def empty(cls, dims: dict[str, int], native: int, classes: int) -> Rows:
        emb = {n: np.zeros((0, d), np.float32) for n, d in dims.items()}
        return cls(np.array([], dtype=str), np.zeros(0, np.int64), np.array([], dtype=str),
                   np.zeros((0, native), np.float32), emb, np.zeros((0, classes), np.float32))

    @classmethod
    def join(cls, parts: list[Rows]) -> Rows:
        """Concatenated and sorted by key: the same order whatever the ranks, workers and batches."""
        order = np.argsort(np.concatenate([p.keys for p in parts]), kind="stable")

        def cat(arrays: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(arrays)[order]

        return cls(cat([p.keys for p in parts]), cat([p.labels for p in parts]),
                   cat([p.paths for p in parts]), cat([p.native for p in parts]),
                   {n: cat([p.emb[n] for p in parts]) for n in parts[0].emb},
                   cat([p.probs for p in parts]),
                   sorted((b for p in parts for b in p.bad), key=lambda b: b.key))

    def __len__(self) -> int:
        return len(self.keys)


def native_row(meta: dict, names: list[str]) -> list[float]:
    values = meta.get("features") or {}
    return [math.nan if values.get(n) is None else float(values[n]) for n in names]


def batch_rows(batch: data.Batch, members: list[Member], tta: str, names: list[str],
               device: torch.device) -> Rows:
    images = batch.images.to(device, non_blocking=True)
    outputs = [embeddings(m, images, tta) for m in members]
    return Rows(np.array(batch.keys, dtype=str), batch.labels.numpy().astype(np.int64),
                np.array([str(m.get("path", "")) for m in batch.meta], dtype=str),
                np.array([native_row(m, names) for m in batch.meta], np.float32).reshape(len(batch.keys), -1),
                {m.name: e.cpu().numpy() for m, (e, _) in zip(members, outputs)},
                combine([p for _, p in outputs], "mean").float().cpu().numpy())


def embed_split(split: ShardSet, members: list[Member], cfg: FeaturesConfig, names: list[str],
                rank: int, world: int, device: torch.device) -> Rows:
    """This rank's samples of the split, sorted by key."""
    empty = Rows.empty(member_dims(members), len(names), len(split.classes))
    return Rows.join([empty, *embedded(split, members, cfg, names, rank, world, device)])


@torch.no_grad()
def embedded(split: ShardSet, members: list[Member], cfg: FeaturesConfig, names: list[str],
             rank: int, world: int, device: torch.device) -> Iterator[Rows]:
    """This rank's samples of the split, one `Rows` per batch with the batch's bad samples (EvalStream
    deals each shard to one rank and worker)."""
    max_bad = cfg.max_bad_fraction
    if max_bad is None:
        max_bad = members[0].config["data"]["max_bad_fraction"]
    transform = bag_members.input_transform(bag_members.augment_config(members[0]), cfg.tta)
    stream = data.EvalStream(split, transform, cfg.batch_size, rank, world, cfg.workers, max_bad,
                             labelled=split.labelled)
    seen = progress.of_ranks(f"features {split.split}", split.num_samples, cfg.progress_every_s, rank == 0,
                             world)
    batches = data.eval_batches(stream, cfg.workers, pin_memory=device.type == "cuda")
    for batch in seen.track(batches, lambda b: len(b.labels) + len(b.bad)):
        rows = (batch_rows(batch, members, cfg.tta, names, device) if len(batch.labels) else
                Rows.empty(member_dims(members), len(names), len(split.classes)))
        rows.bad = list(batch.bad)
        yield rows


def gather(rows: Rows, rank: int, world: int) -> Rows | None:
    """All ranks' rows on rank 0 (sorted by key); None elsewhere."""
    if world == 1:
        return rows
    parts = distributed.gather(vars(rows))  # plain dicts: no class of __main__ to unpickle
    return Rows.join([Rows(**p) for p in parts]) if parts is not None else None


# ---------------------------------------------------------------- members, splits, PCA


def member_dims(members: list[Member]) -> dict[str, int]:
    return {m.name: bag_members.classifier(m.net).in_features for m in members}


def load_splits(cfg: FeaturesConfig) -> list[ShardSet]:
    """Every requested split (the schema checked that each exists and has samples)."""
    return [shardset.load(cfg.data.shards, s) for s in cfg.data.splits]


def check_setup(cfg: FeaturesConfig, members: list[Member], splits: list[ShardSet]) -> None:
    for m in members:
        if m.classes != list(splits[0].classes):
            raise ConfigError(f"member {m.name} was trained on other classes than {cfg.data.shards}")
    dims = member_dims(members)
    widest = sum(dims.values()) if cfg.mode == "concat" else min(dims.values())
    limit = min(widest, splits[0].num_samples)
    if cfg.pca > limit:
        raise ConfigError(f"pca: {cfg.pca} components, but the embeddings have {widest} dims and split "
                          f"{splits[0].split!r} (where PCA is fitted) {splits[0].num_samples} samples")


def arrange(rows: Rows, mode: str) -> Rows:
    if mode == "concat":
        rows.emb = {CONCAT: np.concatenate(list(rows.emb.values()), axis=1)}
    return rows


def fit_pca(rows: Rows, components: int) -> dict:
    """One PCA per embedding array, fitted in float64 with the exact (deterministic) full SVD."""
    from sklearn.decomposition import PCA  # only needed with pca > 0

    if len(rows) < components:
        raise ConfigError(f"pca: {components} components but only {len(rows)} samples were exported")
    return {n: PCA(components, svd_solver="full").fit(x.astype(np.float64)) for n, x in rows.emb.items()}


def project(rows: Rows, pcas: dict) -> Rows:
    if pcas:
        rows.emb = {n: pcas[n].transform(x.astype(np.float64)).astype(np.float32)
                    for n, x in rows.emb.items()}
    return rows


def pca_arrays(pcas: dict) -> dict[str, np.ndarray]:
    arrays = {}
    for name, p in pcas.items():
        arrays |= {f"{name}/mean": p.mean_, f"{name}/components": p.components_,
                   f"{name}/explained_variance_ratio": p.explained_variance_ratio_}
    return arrays


# ---------------------------------------------------------------- writing


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed npz (as np.savez writes) with fixed timestamps, written atomically."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", ZIP_TIME), "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)


def npz_arrays(rows: Rows, classes: list[str], names: list[str]) -> dict[str, np.ndarray]:
    return {"keys": rows.keys, "labels": rows.labels, "classes": np.array(classes, dtype=str),
            "paths": rows.paths, "native": rows.native, "native_names": np.array(names, dtype=str),
            "probs": rows.probs, **{f"emb/{n}": x for n, x in rows.emb.items()}}


def write_parquet(path: Path, rows: Rows, classes: list[str], names: list[str]) -> None:
    """One flat table: key, label, class, path, native.<name> (null where unmeasured), <member>.<i>
    (emb.<i> in concat mode), prob.<class>; the class map also sits in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"key": pa.array(rows.keys.tolist(), pa.string()), "label": pa.array(rows.labels),
               # an unlabelled set's samples have label -1 and no class
               "class": pa.array([classes[i] if i >= 0 else None for i in rows.labels], pa.string()),
               "path": pa.array(rows.paths.tolist(), pa.string())}
    for j, name in enumerate(names):
        columns[f"native.{name}"] = pa.array(rows.native[:, j], from_pandas=True)  # NaN -> null
    for name, x in rows.emb.items():
        prefix = "emb" if name == CONCAT else name
        columns |= {f"{prefix}.{j}": pa.array(col) for j, col in enumerate(np.ascontiguousarray(x.T))}
    columns |= {f"prob.{c}": pa.array(col) for c, col in zip(classes, np.ascontiguousarray(rows.probs.T))}
    table = pa.table(columns).replace_schema_metadata({"taxotrain.classes": json.dumps(classes)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_split(out: Path, split: str, rows: Rows, cfg: FeaturesConfig, classes: list[str],
                names: list[str]) -> Path:
    return write_rows(out / f"features-{split}.{cfg.format}", rows, cfg, classes, names)


def write_rows(path: Path, rows: Rows, cfg: FeaturesConfig, classes: list[str], names: list[str]) -> Path:
    if cfg.format == "npz":
        write_npz(path, npz_arrays(rows, classes, names))
    else:
        write_parquet(path, rows, classes, names)
    return path


def split_record(split: ShardSet, rows: Rows, path: Path) -> dict:
    """Counts that must reconcile: the split's samples = exported + bad."""
    if len(rows) + len(rows.bad) != split.num_samples:
        raise data.DataError(f"split {split.split!r}: {len(rows)} exported + {len(rows.bad)} bad, "
                             f"but the manifest lists {split.num_samples} samples")
    return {"file": path.name, "samples": split.num_samples, "exported": len(rows), "bad": len(rows.bad),
            "bad_samples": [{"key": b.key, "shard": b.shard, "reason": b.reason} for b in rows.bad]}


# ---------------------------------------------------------------- the export


def prepare(cfg: FeaturesConfig, device: torch.device
            ) -> tuple[list[ShardSet], list[Member], list[str], list[str], Path, dict]:
    """What both exports start from: the splits, the checked members, native names, classes, the output
    folder (its log attached only after the checks, so a bad command leaves no folder) and the record."""
    splits = load_splits(cfg)
    members = load_bag(cfg.bag, cfg.members, cfg.checkpoint, device)
    check_setup(cfg, members, splits)
    logfile.attach(cfg.out_dir(), "features", distributed.is_main())  # after the checks: a bad command
    # leaves no folder behind
    names = list(read_info(splits[0].root).features)
    classes = list(splits[0].classes)
    out = cfg.out_dir()
    record = describe(cfg, members, classes, names)
    return splits, members, names, classes, out, record


def export(cfg: FeaturesConfig, rank: int, world: int, device: torch.device) -> dict | None:
    """Every split in order; rank 0 writes and returns the description (features.json), others None."""
    splits, members, names, classes, out, record = prepare(cfg, device)
    pcas: dict = {}
    for split in splits:
        rows = gather(embed_split(split, members, cfg, names, rank, world, device), rank, world)
        if rows is None:
            continue
        rows = arrange(rows, cfg.mode)
        if cfg.pca and not pcas:  # the first split: the only one the projection learns from
            pcas = fit_pca(rows, cfg.pca)
        rows = project(rows, pcas)
        out.mkdir(parents=True, exist_ok=True)
        path = write_split(out, split.split, rows, cfg, classes, names)
        record["splits"][split.split] = split_record(split, rows, path)
        record["dims"] = {n: x.shape[1] for n, x in rows.emb.items()}
        report(split.split, record["splits"][split.split], out)
    if not distributed.is_main():
        return None
    if pcas:
        write_npz(out / "pca.npz", {"fitted_on": np.array(splits[0].split), **pca_arrays(pcas)})
        record["pca"] = {"components": cfg.pca, "fitted_on": splits[0].split, "file": "pca.npz",
                         "explained_variance": {n: float(p.explained_variance_ratio_.sum())
                                                for n, p in pcas.items()}}
    atomic_write(out / "features.json", json.dumps(record, indent=1) + "\n")  # last: the export is whole
    return record


def describe(cfg: FeaturesConfig, members: list[Member], classes: list[str], names: list[str]) -> dict:
    dims = member_dims(members)
    return {"format": cfg.format, "mode": cfg.mode, "tta": cfg.tta, "checkpoint": cfg.checkpoint,
            "bag": str(Path(cfg.bag).resolve()), "shards": str(Path(cfg.data.shards).resolve()),
            "members": [{"name": m.name, "model": m.model_name, "step": m.step, "dim": dims[m.name]}
                        for m in members],
            "classes": classes, "native_names": names, "dims": {}, "splits": {}, "pca": None}


def report(split: str, entry: dict, out: Path) -> None:
    where = (out / entry["file"] if "file" in entry
             else f"{len(entry['files'])} file(s) in {out / entry['folder']}")
    logfile.echo(f"{split}: {entry['exported']} exported + {entry['bad']} bad = {entry['samples']} samples "
                 f"-> {where}")
    if entry["bad"] and "bad_samples" in entry:
        logfile.echo(f"  bad samples in {split}: " + ", ".join(b["key"] for b in entry["bad_samples"]))
    elif entry["bad"]:
        logfile.echo(f"  bad samples in {split}: listed in {out / entry['folder']}/bad-*.tsv")


def run(cfg: FeaturesConfig) -> int:
    env = distributed.detect()
    device = distributed.init(env, cfg.dist_timeout_s)
    out = cfg.out_dir()
    try:
        with lock.writing(out, "features", env):
            (export_parts if cfg.parts else export)(cfg, env.rank, env.world_size, device)
            distributed.barrier()  # a rank-0 failure while writing fails every rank, not only rank 0
        return 0
    finally:
        distributed.cleanup()


# ---------------------------------------------------------------- parts=true: no row crosses ranks


def export_parts(cfg: FeaturesConfig, rank: int, world: int, device: torch.device) -> dict | None:
    """Every split in order, each rank writing its rows as files of about `part_rows` rows into
    `features-<split>/`; rank 0 learns counts only and writes features.json listing the files."""
    splits, members, names, classes, out, record = prepare(cfg, device)
    dims = member_dims(members)
    record["dims"] = {CONCAT: sum(dims.values())} if cfg.mode == "concat" else dims
    if distributed.is_main():
        start_over(out, splits)
    distributed.barrier()  # nobody writes a part before the old ones are gone
    for split in splits:
        entry = split_parts(split, members, cfg, names, out, rank, world, device)
        if entry is not None:
            record["splits"][split.split] = entry
            report(split.split, entry, out)
    if not distributed.is_main():
        return None
    atomic_write(out / "features.json", json.dumps(record, indent=1) + "\n")  # last: the export is whole
    return record


def start_over(out: Path, splits: list[ShardSet]) -> None:
    """features.json first (it would vouch for files about to go), then the splits' old part folders."""
    (out / "features.json").unlink(missing_ok=True)
    for split in splits:
        shutil.rmtree(out / parts_folder(split.split), ignore_errors=True)


def parts_folder(split: str) -> str:
    return f"features-{split}"


def split_parts(split: ShardSet, members: list[Member], cfg: FeaturesConfig, names: list[str], out: Path,
                rank: int, world: int, device: torch.device) -> dict | None:
    """This rank's files of one split; then (files, exported, bad) of every rank, and a failure flag so
    that ranks fail together, are summed: the only thing that crosses ranks. The entry on rank 0."""
    counts, failure = [0, 0, 0], None
    try:
        counts = write_rank_parts(split, members, cfg, names, out / parts_folder(split.split), rank, world,
                                  device)
    except Exception as err:  # re-raised below, after the others learnt of it
        log.error("rank %d, split %s: %s", rank, split.split, err)
        failure = err
    table = torch.zeros(world * 3 + 1, dtype=torch.int64)
    table[rank * 3:rank * 3 + 3] = torch.tensor(counts)
    table[-1] = failure is not None
    table = distributed.all_sum(table)
    if failure is not None:
        raise failure
    if table[-1]:
        raise RunFailure(f"split {split.split!r}: {int(table[-1])} other rank(s) failed (see their output)")
    if not distributed.is_main():
        return None
    return parts_entry(split, out, table[:-1].view(world, 3).tolist(), cfg.format)


def write_rank_parts(split: ShardSet, members: list[Member], cfg: FeaturesConfig, names: list[str],
                     folder: Path, rank: int, world: int, device: torch.device) -> list[int]:
    """(files, exported, bad) of this rank: rows in files of about part_rows (sorted by key inside each),
    bad samples in `bad-<rank>.tsv`; memory holds one file's rows at most."""
    classes = list(split.classes)
    held: list[Rows] = []
    files = exported = bad = 0
    listed = folder / f"bad-{rank:05d}.tsv"
    with atomic_path(listed) as tmp, open(tmp, "x", newline="", encoding="utf-8") as fh:
        listing = csv.writer(fh, delimiter="\t", lineterminator="\n")
        listing.writerow(["key", "shard", "reason"])
        for rows in embedded(split, members, cfg, names, rank, world, device):
            listing.writerows([b.key, b.shard, b.reason] for b in rows.bad)
            bad += len(rows.bad)
            held.append(rows)
            if sum(map(len, held)) >= cfg.part_rows:
                exported += flush(held, folder / part_file(rank, files, cfg.format), cfg, classes, names)
                files, held = files + 1, []
        if sum(map(len, held)):
            exported += flush(held, folder / part_file(rank, files, cfg.format), cfg, classes, names)
            files += 1
    return [files, exported, bad]


def part_file(rank: int, index: int, fmt: str) -> str:
    return f"part-{rank:05d}-{index:05d}.{fmt}"


def flush(held: list[Rows], path: Path, cfg: FeaturesConfig, classes: list[str], names: list[str]) -> int:
    rows = arrange(Rows.join(held), cfg.mode)
    write_rows(path, rows, cfg, classes, names)
    return len(rows)


def parts_entry(split: ShardSet, out: Path, table: list[list[int]], fmt: str) -> dict:
    """The split's entry of features.json: every rank's files (which must exist) and counts that
    reconcile with the manifest: samples = exported + bad."""
    folder = parts_folder(split.split)
    files = [f"{folder}/{part_file(r, i, fmt)}" for r, (n, _, _) in enumerate(table) for i in range(n)]
    missing = [f for f in files if not (out / f).is_file()]
    if missing:
        raise data.DataError(f"split {split.split!r}: part files missing after every rank wrote: {missing}")
    exported, bad = sum(row[1] for row in table), sum(row[2] for row in table)
    if exported + bad != split.num_samples:
        raise data.DataError(f"split {split.split!r}: {exported} exported + {bad} bad, but the manifest "
                             f"lists {split.num_samples} samples")
    listed = [f"{folder}/bad-{r:05d}.tsv" for r in range(len(table))]
    return {"folder": folder, "files": files, "bad_files": listed, "samples": split.num_samples,
            "exported": exported, "bad": bad}
