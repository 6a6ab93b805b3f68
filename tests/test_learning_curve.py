"""Learning curves: nested per-key training subsets (`data.fraction`) and launch.learning_curve."""
from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image
from train_fixtures import final_state, write_shardset

from trainer.config import CurveRunConfig
from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.transforms import AugmentConfig, train_transform
from trainer.jobs.curve import learning_curve
from trainer.runtime.exits import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
ConfigStore.instance().store(name="curve_schema", node=CurveRunConfig)  # as launch.learning_curve does
KEYS = [f"key-{i:05d}" for i in range(20000)]
CLASS_OF = {k: i % 5 for i, k in enumerate(KEYS)}


def kept(seed: int, fraction: float, keys=KEYS) -> set[str]:
    return {k for k in keys if data.in_subset(seed, k, fraction)}


def test_subsets_are_nested_deterministic_and_keep_the_fraction_of_every_class():
    subsets = {f: kept(3, f) for f in (0.1, 0.25, 0.5, 1.0)}
    assert subsets[0.1] < subsets[0.25] < subsets[0.5] < subsets[1.0] == set(KEYS)
    assert kept(3, 0.25) == subsets[0.25]  # the same on every rerun, rank and worker
    assert kept(4, 0.25) != subsets[0.25]  # another fraction_seed, another subset
    for f in (0.1, 0.25, 0.5):
        assert len(subsets[f]) / len(KEYS) == pytest.approx(f, abs=0.015)
        per_class = Counter(CLASS_OF[k] for k in subsets[f])
        assert sorted(per_class) == [0, 1, 2, 3, 4]
        for count in per_class.values():  # 4000 keys per class: stratified in expectation
            assert count / 4000 == pytest.approx(f, abs=0.03)


def test_a_stream_with_fraction_half_yields_exactly_its_subset_then_the_bootstrap_of_it(tmp_path):
    split = shardset.load(write_shardset(tmp_path / "s", {"train": [60, 60]}), "train")
    keys = [s["__key__"] for shard in split.shards for s in data.read_shard(shard)]
    subset = kept(3, 0.5, keys)
    assert 30 < len(subset) < 90
    transform = train_transform(AugmentConfig(crop_size=8))
    # buffer of 1: the first pass over the shards comes out whole
    cfg = data.StreamConfig(4, 0, shuffle_buffer=1, shuffle_initial=1, fraction=0.5, fraction_seed=3)
    stream = data.TrainStream(split, transform, cfg, 0, 1, 1, 30)
    seen = Counter(s["__key__"] for _, s in zip(range(len(subset)), stream._shuffled(0)))
    assert seen == Counter(subset)  # each subset sample once, nothing else
    bagged = data.StreamConfig(4, 0, shuffle_buffer=1, shuffle_initial=1, fraction=0.5, fraction_seed=3,
                               bootstrap_member=1, bootstrap_seed=2)
    expected = Counter({k: data.bootstrap_count(2, 1, k) for k in subset})
    stream = data.TrainStream(split, transform, bagged, 0, 1, 1, 30)
    seen = Counter(s["__key__"] for _, s in zip(range(sum(expected.values())), stream._shuffled(0)))
    assert seen == +expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shardset(tmp_path_factory.mktemp("curve") / "s", {"train": [4], "val": [2], "test": [2]})


def load(shards: Path, *overrides: str) -> CurveRunConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose("curve", overrides=[f"data.shards={shards}", "run_dir=/r", *overrides])
    return OmegaConf.to_object(raw)


@pytest.mark.parametrize(("override", "key"), [
    ("data.fraction=0", "data.fraction"),
    ("data.fraction=1.5", "data.fraction"),
    ("curve.fractions=[0.5,0.2]", "curve.fractions"),
    ("curve.fractions=[]", "curve.fractions"),
    ("curve.fractions=[0.5,1.2]", "curve.fractions"),
    ("curve.fractions=[0.1,0.1001]", "curve.fractions"),
    ("curve.only=2", "curve.only"),
])
def test_impossible_curve_values_name_the_key(tiny, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(tiny, "curve.fractions=[0.25,1.0]", override)


def test_curve_overrides_are_typed(tiny):
    assert load(tiny, "curve.fractions=[0.1,0.5,1]", "data.fraction=0.3").curve.fractions == [0.1, 0.5, 1.0]
    with pytest.raises(ConfigCompositionException):
        load(tiny, "curve.fractions=[a,b]")
    with pytest.raises(ConfigCompositionException):
        load(tiny, "curve.fraction=[0.5]")


def curve_config(shards: Path, run_dir: Path, *overrides: str) -> CurveRunConfig:
    dots = [f"data.shards={shards}", f"run_dir={run_dir}", "model.name=resnet18", "data.crop_size=16",
            "loader.batch_size=4", "loader.workers=0", "loader.pin_memory=false", "logger.mode=disabled",
            "trainer.max_steps=3", "data.val_split=null", "schedule.warmup_epochs=0",
            "curve.fractions=[0.5,1.0]", "data.fraction_seed=3", *overrides]
    merged = OmegaConf.merge(OmegaConf.structured(CurveRunConfig), OmegaConf.from_dotlist(dots))
    return OmegaConf.to_object(merged)


def labels_by_key(root: Path, split: str) -> dict[str, int]:
    """Read the tars independently of the loader: member names and .cls contents."""
    out = {}
    for path in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "cls":
                    out[key] = int(tar.extractfile(member).read())
    return out


def test_a_curve_of_two_fractions_trains_evaluates_and_reports(tmp_path):
    shards = write_shardset(tmp_path / "s", {"train": [40, 40, 40], "test": [12]})
    out = tmp_path / "curve"
    assert learning_curve(curve_config(shards, out)) == 0

    labels = labels_by_key(shards, "train")
    with (out / "learning_curve.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["fraction-0.500", "fraction-1.000"]
    for r in rows:
        per_class = Counter(labels[k] for k in kept(3, float(r["fraction"]), labels))
        assert int(r["train_images"]) == sum(per_class.values())
        assert int(r["train_images_per_class_min"]) == min(per_class.values())
        assert int(r["n"]) == 12
        assert 0 <= float(r["top1"]) <= float(r["top5"]) <= 1 and float(r["nll"]) > 0
    images = [int(r["train_images"]) for r in rows]
    assert 40 < images[0] < images[1] == 120

    # each point is a normal run with data.fraction set; its epoch is the expected subset size
    half, full = final_state(out / "fraction-0.500"), final_state(out / "fraction-1.000")
    assert half["config"]["data"]["fraction"] == 0.5 and full["config"]["data"]["fraction"] == 1.0
    assert half["recipe"]["steps_per_epoch"] == 60 // 4 and half["recipe"]["data_fraction"] == 0.5
    assert full["recipe"]["steps_per_epoch"] == 120 // 4 and "data_fraction" not in full["recipe"]

    png = (out / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "learning_curve.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    record = json.loads((out / "curve.json").read_text())
    assert [r["train_images"] for r in record["results"]] == images and record["eval_split"] == "test"

    # a rerun has nothing left to train and rewrites the report
    (out / "learning_curve.csv").unlink()
    assert learning_curve(curve_config(shards, out)) == 0
    assert final_state(out / "fraction-0.500")["step"] == 3
    assert len(list((out / "fraction-0.500" / "checkpoints").glob("step-*.pt"))) == 1
    assert (out / "learning_curve.csv").is_file()


def test_an_absent_eval_split_or_unfinished_runs_fail_before_any_work(tmp_path):
    shards = write_shardset(tmp_path / "s", {"train": [20, 20]})
    out = tmp_path / "curve"
    with pytest.raises(ConfigError, match="curve.eval_split='holdout'.*no split 'holdout'"):
        learning_curve(curve_config(shards, out, "curve.eval_split=holdout"))
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"\['fraction-0\.500', 'fraction-1\.000'\].*not finished"):
        learning_curve(curve_config(shards, out, "curve.eval_split=train", "curve.report_only=true"))
