"""Fit and predict throughput of the classical heads: `engine=sklearn` against `engine=spark` in local mode.

Generated features folders in parquet (the format both engines read), one per training size (default
10k, 30k and 100k rows), each with val and test splits of a fifth of that: `--classes` Gaussian blobs
in `--deep` embedding columns (one member) plus `--native` instrument columns (the first class-dependent
too, 5% missing). Every head is the issue's recipe with one candidate (no search, so the one fit is the
final fit on every training row): inputs=both, pca=`--pca`, the linear models standardised. For each
size, kind and engine: `fit_rows_per_s` (training rows / the final fit's seconds) and
`predict_rows_per_s` (val + test rows / the seconds to produce their probabilities on the driver), as
the engines report them in `engine.Fitted`, and the wall time of the whole `fit()` call (reading the
files, the checks, saving the model). One Spark session for the run, warmed by a small fit that is not
reported (JVM start and JIT compilation are a one-off cost, not a per-row one). Sizes and engines are
interleaved over `--repeats` rounds; the table gives the median and the spread.

    python benchmarks/head_engines.py --work /tmp/head-bench --json /tmp/head-bench/rows.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, table  # noqa: E402
from trainer.heads import engine  # noqa: E402
from trainer.heads import table as features_table  # noqa: E402
from trainer.heads.config import HeadModel, HeadRunConfig, SparkConfig  # noqa: E402
from trainer.inference.features import Rows, write_parquet  # noqa: E402

MEMBER = "member-00"


@dataclass(frozen=True)
class Row:
    rows: int
    kind: str
    engine: str
    fit_rows_per_s: float
    fit_min: float
    fit_max: float
    predict_rows_per_s: float
    predict_min: float
    predict_max: float
    wall_s: float
    test_top1: float
    repeats: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rows", nargs="+", type=int, default=[10_000, 30_000, 100_000], help="training rows")
    p.add_argument("--deep", type=int, default=590, help="embedding columns")
    p.add_argument("--native", type=int, default=10, help="native columns")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--kinds", nargs="+", default=["logistic", "random_forest"],
                   choices=("logistic", "random_forest", "linear_svm"))
    p.add_argument("--engines", nargs="+", default=["sklearn", "spark"], choices=("sklearn", "spark"))
    p.add_argument("--trees", type=int, default=20, help="random_forest: a small forest keeps this minutes")
    p.add_argument("--pca", type=int, default=50)
    p.add_argument("--master", default="local[2]", help="spark.master")
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--jobs", type=int, default=-1, help="sklearn n_jobs")
    p.add_argument("--repeats", type=int, default=1, help="rounds over every size, kind and engine")
    p.add_argument("--work", type=Path, help="where the features folders go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    return p.parse_args(argv)


def generate(root: Path, train: int, args: argparse.Namespace, seed: int = 0) -> Path:
    """A features folder as taxotrain-features writes it (its own parquet writer), made once per size."""
    if (root / "features.json").is_file():
        return root
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.15, (args.classes, args.deep)).astype(np.float32)
    native_centres = rng.normal(0, 1, (args.classes, args.native)).astype(np.float32)
    names = [f"m{j}" for j in range(args.native)]
    classes = [f"class{c}" for c in range(args.classes)]
    record = {"format": "parquet", "mode": "per_member", "tta": "none", "checkpoint": "best",
              "bag": "/bags/generated", "shards": "/shards/generated",
              "members": [{"name": MEMBER, "model": "generated", "step": 0, "dim": args.deep}],
              "classes": classes, "native_names": names, "dims": {MEMBER: args.deep}, "splits": {},
              "pca": None}
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("val", train // 5), ("test", train // 5)):
        labels = rng.integers(0, args.classes, n)
        emb = centres[labels] + rng.normal(0, 1, (n, args.deep)).astype(np.float32)
        native = native_centres[labels] + rng.normal(0, 1, (n, args.native)).astype(np.float32)
        native[rng.random(native.shape) < 0.05] = np.nan
        keys = np.array([f"{split}{i:07d}" for i in range(n)])
        rows = Rows(keys, labels.astype(np.int64), np.array([f"{k}.png" for k in keys]), native,
                    {MEMBER: emb}, np.full((n, args.classes), 1 / args.classes, np.float32))
        write_parquet(root / f"features-{split}.parquet", rows, classes, names)
        record["splits"][split] = {"file": f"features-{split}.parquet", "samples": n, "exported": n, "bad": 0,
                                   "bad_samples": []}
    (root / "features.json").write_text(json.dumps(record, indent=1) + "\n")
    return root


def head(kind: str, args: argparse.Namespace) -> HeadModel:
    if kind == "random_forest":
        return HeadModel(kind=kind, trees=args.trees, min_samples_leaf=[1], max_features=[0.3])
    return HeadModel(kind=kind, c=[1.0])


def fit_once(root: Path, kind: str, name: str, args: argparse.Namespace, out: Path) -> dict:
    data = features_table.load(root, ["train", "val", "test"], ("train", "val", "test"))
    cfg = HeadRunConfig(features=str(root), head=head(kind, args), inputs="both", pca=args.pca, engine=name,
                        search_rows=len(data.splits["train"]), n_jobs=args.jobs,
                        spark=SparkConfig(master=args.master, driver_memory=args.driver_memory))
    if name == "spark":
        from trainer.heads import spark_engine as module
    else:
        from trainer.heads import sklearn_engine as module
    start = time.perf_counter()
    fitted = module.fit(cfg, data, out)
    wall = time.perf_counter() - start
    top1 = engine.top1(fitted.probs["test"], data.splits["test"].labels)
    print(f"  {len(data.splits['train']):>7} rows {kind:<14} {name:<8} "
          f"fit {fitted.fit_rows_per_s:10.0f} rows/s  predict {fitted.predict_rows_per_s:10.0f} rows/s  "
          f"wall {wall:6.1f} s  test top1 {top1:.3f}",
          flush=True)
    return {"fit": fitted.fit_rows_per_s, "predict": fitted.predict_rows_per_s, "wall": wall, "top1": top1}


def summarise(key: tuple[int, str, str], runs: list[dict]) -> Row:
    fit, predict = [r["fit"] for r in runs], [r["predict"] for r in runs]
    wall, top1 = [r["wall"] for r in runs], [r["top1"] for r in runs]
    return Row(*key, statistics.median(fit), min(fit), max(fit), statistics.median(predict), min(predict),
               max(predict), statistics.median(wall), statistics.median(top1), len(runs))


def growth(rows: list[Row]) -> list[list[str]]:
    """Per kind and engine: how the fit and predict rates move from the smallest size to the largest."""
    out = []
    for kind, name in sorted({(r.kind, r.engine) for r in rows}):
        mine = sorted((r for r in rows if (r.kind, r.engine) == (kind, name)), key=lambda r: r.rows)
        small, large = mine[0], mine[-1]
        out.append([kind, name, f"{small.rows:,} -> {large.rows:,}",
                    f"{large.fit_rows_per_s / small.fit_rows_per_s:.2f}x",
                    f"{large.predict_rows_per_s / small.predict_rows_per_s:.2f}x"])
    return out


def versions() -> str:
    import pyspark
    import sklearn

    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    return (f"scikit-learn {sklearn.__version__}, pyspark {pyspark.__version__}, "
            f"{java[0] if java else 'no java'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="head-bench-"))
    roots = {n: generate(work / f"features-{n}", n, args) for n in sorted(args.rows)}
    session = None
    if "spark" in args.engines:
        from trainer.heads import spark_engine

        spark = SparkConfig(master=args.master, driver_memory=args.driver_memory)
        session = spark_engine.start_session(spark, Path(tempfile.mkdtemp(prefix="spark-local-")))
        warm = generate(work / "features-warmup", 2_000, args)
        for kind in args.kinds:
            print(f"warm-up (not reported): {kind} spark", flush=True)
            fit_once(warm, kind, "spark", args, work / "out")
    runs: dict[tuple[int, str, str], list[dict]] = {}
    try:
        for round_ in range(args.repeats):
            print(f"round {round_ + 1}/{args.repeats}", flush=True)
            for n, root in roots.items():
                for kind in args.kinds:
                    for name in args.engines:
                        run = fit_once(root, kind, name, args, work / "out")
                        runs.setdefault((n, kind, name), []).append(run)
    finally:
        if session is not None:
            session.stop()
    rows = [summarise(k, v) for k, v in runs.items()]
    print(f"\nmachine: {machine()}\n{versions()}, spark.master={args.master}, sklearn n_jobs={args.jobs}, "
          f"os.cpu_count()={os.cpu_count()}")
    print(f"{args.deep} deep + {args.native} native columns, {args.classes} classes, inputs=both, "
          f"pca={args.pca}, random_forest trees={args.trees}; val = test = train / 5 rows\n")
    print(table(("train rows>", "head", "engine", "fit rows/s>", "fit min-max>", "predict rows/s>",
                 "predict min-max>", "fit() wall s>", "test top-1>", "runs>"),
                [(f"{r.rows:,}", r.kind, r.engine, f"{r.fit_rows_per_s:,.0f}",
                  f"{r.fit_min:,.0f}-{r.fit_max:,.0f}", f"{r.predict_rows_per_s:,.0f}",
                  f"{r.predict_min:,.0f}-{r.predict_max:,.0f}", f"{r.wall_s:.1f}", f"{r.test_top1:.3f}",
                  r.repeats)
                 for r in rows]))
    print()
    print(table(("head", "engine", "train rows", "fit rows/s, large / small>",
                 "predict rows/s, large / small>"), growth(rows)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
