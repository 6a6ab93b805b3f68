"""launch.features: embeddings of a bag of two against direct computation, native features, concat, PCA
fitted on train only, parquet, bad samples, settings, and two real gloo ranks."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.decomposition import PCA
from test_bag import bag_config
from train_fixtures import CLASSES, write_shardset

from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.transforms import decode
from trainer.inference import members
from trainer.inference.config import FeaturesConfig
from trainer.inference.features import run
from trainer.jobs.bag import train_bag
from trainer.runtime import distributed
from trainer.runtime.cli import typed
from trainer.runtime.exits import ConfigError

REPO = Path(__file__).resolve().parents[1]
SIZES = {"train": [16, 12], "val": [8], "test": [13, 9]}
NATIVE = ("area", "perimeter")
BAD = ("test", 0, 3)  # (split, shard, position) of the one undecodable sample
MEMBERS = ("member-00", "member-01")


@pytest.fixture(scope="module", autouse=True)
def cpu_one_thread():
    # CPU on every machine, so the exporter's numerics are those of the direct computation below; one
    # thread: on tiny convolutions OpenMP's spinning threads cost ~20x on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "select_device", lambda _local_rank: torch.device("cpu"))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bag(tmp_path_factory, cpu_one_thread) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("features")
    shards = write_shardset(root / "s", SIZES, corrupt={BAD[:2]: [BAD[2]]}, features=NATIVE)
    assert train_bag(bag_config(shards, root / "bag", "bag.members=2")) == 0
    return shards, root / "bag"


def config(shards: Path, bag: Path, out: Path, *overrides: str) -> FeaturesConfig:
    dots = [f"bag={bag}", f"data.shards={shards}", f"out={out}", "batch_size=5", "workers=0",
            "max_bad_fraction=0.2", *overrides]
    return typed(FeaturesConfig, OmegaConf.from_dotlist(dots))


def export(shards: Path, bag: Path, out: Path, *overrides: str) -> dict:
    assert run(config(shards, bag, out, *overrides)) == 0
    return json.loads((out / "features.json").read_text())


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:  # nothing in it may need unpickling
        return {k: npz[k] for k in npz.files}


def shard_samples(shards: Path, split: str) -> dict[str, dict]:
    """Every raw sample of a split by key, read straight from the tars."""
    return {s["__key__"]: s for shard in shardset.load(shards, split).shards for s in data.read_shard(shard)}


def bad_key(shards: Path) -> str:
    split, index, position = BAD
    shard = shardset.load(shards, split).shards[index]
    return list(data.read_shard(shard))[position]["__key__"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct(member: members.Member, sample: dict, tta: str) -> tuple[torch.Tensor, torch.Tensor]:
    image, _ = decode(sample, len(CLASSES))
    image = members.input_transform(members.augment_config(member), tta)(image)
    emb, probs = members.embeddings(member, image[None], tta)
    return emb[0], probs[0]


def test_per_member_npz_rows_labels_native_and_embeddings_match_direct_computation(bag, tmp_path, capsys):
    shards, bag_dir = bag
    record = export(shards, bag_dir, tmp_path / "a", "workers=2")
    printed = capsys.readouterr().out
    loaded = members.load_bag(bag_dir, [], "best", torch.device("cpu"))
    assert [m["name"] for m in record["members"]] == list(MEMBERS)
    dims = {members.classifier(m.net).in_features for m in loaded}  # resnet18's fc takes 512
    assert {m["dim"] for m in record["members"]} == dims == {512}
    assert record["native_names"] == list(NATIVE) and record["pca"] is None
    for split, sizes in SIZES.items():
        entry = record["splits"][split]
        assert entry["samples"] == sum(sizes) == entry["exported"] + entry["bad"]
        arrays = load(tmp_path / "a" / f"features-{split}.npz")
        raw = shard_samples(shards, split)
        keys = arrays["keys"].tolist()
        assert keys == sorted(keys) and len(set(keys)) == len(keys) == entry["exported"]
        assert set(keys) | {b["key"] for b in entry["bad_samples"]} == set(raw)
        assert arrays["labels"].dtype == np.int64
        assert arrays["labels"].tolist() == [int(raw[k]["cls"]) for k in keys]
        assert arrays["classes"].tolist() == list(CLASSES)
        metas = [json.loads(raw[k]["json"]) for k in keys]
        assert arrays["paths"].tolist() == [m["path"] for m in metas]
        expected = np.array([[math.nan if m["features"][n] is None else m["features"][n] for n in NATIVE]
                             for m in metas], np.float32)
        assert arrays["native"].dtype == np.float32 and np.isnan(expected).any()
        np.testing.assert_array_equal(arrays["native"], expected)  # NaN where the .json has null
        assert arrays["native_names"].tolist() == list(NATIVE)
        for name in MEMBERS:
            emb = arrays[f"emb/{name}"]
            assert emb.shape == (len(keys), 512) and emb.dtype == np.float32
        np.testing.assert_allclose(arrays["probs"].sum(1), 1.0, atol=1e-5)
    # a bad sample is counted, listed and printed, not exported
    test = record["splits"]["test"]
    assert test["bad"] == 1 and [b["key"] for b in test["bad_samples"]] == [bad_key(shards)]
    assert bad_key(shards) in printed and "21 exported + 1 bad = 22 samples" in printed
    # one sample, computed here without the exporter
    arrays = load(tmp_path / "a" / "features-test.npz")
    row = 7
    sample = shard_samples(shards, "test")[str(arrays["keys"][row])]
    outs = [direct(m, sample, "none") for m in loaded]
    for m, (emb, _) in zip(loaded, outs):
        np.testing.assert_allclose(arrays[f"emb/{m.name}"][row], emb.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arrays["probs"][row], ((outs[0][1] + outs[1][1]) / 2).numpy(), atol=1e-6)
    # a rerun writes the same bytes (fixed zip timestamps, rows sorted by key)
    export(shards, bag_dir, tmp_path / "b", "workers=2", "data.splits=[val,test]")
    for split in ("val", "test"):
        name = f"features-{split}.npz"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tta_and_member_subset(bag, tmp_path):
    shards, bag_dir = bag
    record = export(shards, bag_dir, tmp_path / "h", "tta=hflip", "members=[member-01]", "data.splits=[val]")
    assert [m["name"] for m in record["members"]] == ["member-01"] and list(record["splits"]) == ["val"]
    arrays = load(tmp_path / "h" / "features-val.npz")
    assert [k for k in arrays if k.startswith("emb/")] == ["emb/member-01"]
    member = members.load_bag(bag_dir, ["member-01"], "best", torch.device("cpu"))[0]
    sample = shard_samples(shards, "val")[str(arrays["keys"][0])]
    flipped, plain = direct(member, sample, "hflip")[0].numpy(), direct(member, sample, "none")[0].numpy()
    np.testing.assert_allclose(arrays["emb/member-01"][0], flipped, rtol=1e-4, atol=1e-5)
    assert not np.allclose(flipped, plain, atol=1e-4)  # the mirrored view really took part


def test_concat_is_the_members_side_by_side_and_pca_is_fitted_on_train_only(bag, tmp_path):
    shards, bag_dir = bag
    export(shards, bag_dir, tmp_path / "m", "data.splits=[train,test]")
    raw = {}  # concat mode before any projection: the members side by side
    for split in ("train", "test"):
        each = load(tmp_path / "m" / f"features-{split}.npz")
        raw[split] = np.concatenate([each[f"emb/{n}"] for n in MEMBERS], axis=1)

    # the first split listed is the only one the projection learns from; every split is projected with it
    record = export(shards, bag_dir, tmp_path / "p", "mode=concat", "pca=4", "data.splits=[train,test]")
    assert record["pca"]["fitted_on"] == "train" and record["dims"] == {"ensemble": 4}
    saved = load(tmp_path / "p" / "pca.npz")
    assert str(saved["fitted_on"]) == "train"
    on_train = PCA(4, svd_solver="full").fit(raw["train"].astype(np.float64))
    np.testing.assert_allclose(saved["ensemble/components"], on_train.components_, atol=1e-6)
    np.testing.assert_allclose(saved["ensemble/mean"], on_train.mean_, atol=1e-6)
    np.testing.assert_allclose(saved["ensemble/explained_variance_ratio"], on_train.explained_variance_ratio_,
                               atol=1e-6)
    on_both = PCA(4, svd_solver="full").fit(np.concatenate([raw["train"], raw["test"]]).astype(np.float64))
    assert not np.allclose(np.abs(on_both.components_), np.abs(on_train.components_), atol=1e-3)
    test = load(tmp_path / "p" / "features-test.npz")["emb/ensemble"]
    np.testing.assert_allclose(test, on_train.transform(raw["test"].astype(np.float64)), rtol=1e-4, atol=1e-4)

    # per member: one PCA each, on that member's train embeddings
    export(shards, bag_dir, tmp_path / "q", "pca=3", "data.splits=[train]")
    saved = load(tmp_path / "q" / "pca.npz")
    train = load(tmp_path / "m" / "features-train.npz")
    for name in MEMBERS:
        fitted = PCA(3, svd_solver="full").fit(train[f"emb/{name}"].astype(np.float64))
        np.testing.assert_allclose(saved[f"{name}/components"], fitted.components_, atol=1e-6)
        assert load(tmp_path / "q" / "features-train.npz")[f"emb/{name}"].shape == (28, 3)


def test_parquet_is_one_flat_table_with_the_same_values(bag, tmp_path):
    import pyarrow.parquet as pq

    shards, bag_dir = bag
    export(shards, bag_dir, tmp_path / "n", "data.splits=[test]")
    record = export(shards, bag_dir, tmp_path / "q", "format=parquet", "data.splits=[test]")
    assert record["format"] == "parquet" and record["splits"]["test"]["file"] == "features-test.parquet"
    table = pq.read_table(tmp_path / "q" / "features-test.parquet")
    emb_columns = [f"{n}.{i}" for n in MEMBERS for i in range(512)]
    assert table.column_names == ["key", "label", "class", "path", "native.area", "native.perimeter",
                                  *emb_columns, *(f"prob.{c}" for c in CLASSES)]
    arrays = load(tmp_path / "n" / "features-test.npz")
    assert table["key"].to_pylist() == arrays["keys"].tolist()
    assert table["label"].to_pylist() == arrays["labels"].tolist()
    assert table["class"].to_pylist() == [CLASSES[i] for i in arrays["labels"]]
    area = arrays["native"][:, 0]
    assert table["native.area"].null_count == np.isnan(area).sum() > 0  # unmeasured: null
    np.testing.assert_array_equal(table["native.area"].to_numpy(zero_copy_only=False), area)
    np.testing.assert_array_equal(table["member-01.17"].to_numpy(), arrays["emb/member-01"][:, 17])
    assert json.loads(table.schema.metadata[b"taxotrain.classes"]) == list(CLASSES)
    concat = export(shards, bag_dir, tmp_path / "r", "format=parquet", "mode=concat", "data.splits=[test]")
    side_by_side = pq.read_table(tmp_path / "r" / "features-test.parquet")
    assert concat["dims"] == {"ensemble": 1024} and "member-00.0" not in side_by_side.column_names
    assert side_by_side.column_names[4 + len(NATIVE):-len(CLASSES)] == [f"emb.{i}" for i in range(1024)]
    for column, (name, i) in {"emb.0": ("member-00", 0), "emb.511": ("member-00", 511),
                              "emb.512": ("member-01", 0), "emb.1023": ("member-01", 511)}.items():
        np.testing.assert_array_equal(side_by_side[column].to_numpy(), arrays[f"emb/{name}"][:, i])


@pytest.mark.parametrize("override, key", [
    ("mode=stacked", "mode"), ("format=csv", "format"), ("pca=-1", "pca"), ("tta=sixcrop", "tta"),
    ("checkpoint=first", "checkpoint"), ("data.splits=[]", "data.splits"),
    ("data.splits=[train,train]", "data.splits"), ("max_bad_fraction=1.5", "max_bad_fraction"),
])
def test_bad_values_fail_at_startup_naming_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        config(tmp_path, tmp_path, tmp_path / "o", override)


def test_bad_splits_members_and_pca_fail_before_any_file(bag, tmp_path):
    shards, bag_dir = bag
    present = r"present: \['test', 'train', 'val'\]"
    with pytest.raises(ConfigError, match=r"data.splits: .*no split 'holdout'; " + present):
        run(config(shards, bag_dir, tmp_path / "o", "data.splits=[train,holdout]"))
    with pytest.raises(ConfigError, match="pca: 1000 components"):
        run(config(shards, bag_dir, tmp_path / "o", "pca=1000", "mode=concat"))
    with pytest.raises(ConfigError, match="member-07"):
        run(config(shards, bag_dir, tmp_path / "o", "members=[member-07]"))
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "o").exists()


def test_command_line_exits_2_naming_the_key(bag, tmp_path):
    shards, bag_dir = bag
    args = [f"bag={bag_dir}", f"data.shards={shards}", f"out={tmp_path}/o", "mode=stacked"]
    done = subprocess.run([sys.executable, "-m", "launch.features", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = done.stdout + done.stderr  # Hydra refuses the choice while composing, naming key and choices
    assert done.returncode == 2 and "full_key: mode" in out and "[per_member, concat]" in out
    assert not (tmp_path / "o").exists()


def test_two_gloo_ranks_write_what_one_process_writes(bag, tmp_path):
    shards, bag_dir = bag
    export(shards, bag_dir, tmp_path / "one")
    port, procs = free_port(), []
    for rank in range(2):  # torchrun's variables, one process per rank (no agent in between)
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.features", f"bag={bag_dir}", f"data.shards={shards}",
             f"out={tmp_path}/two", "batch_size=5", "workers=0",
             "max_bad_fraction=0.2", "dist_timeout_s=60"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "exported" in outputs[0] and "exported" not in outputs[1]  # rank 0 alone reports and writes
    one, two = (json.loads((tmp_path / d / "features.json").read_text()) for d in ("one", "two"))
    assert one["splits"] == two["splits"]
    for split in SIZES:  # val has one shard: rank 1 sends no rows
        name = f"features-{split}.npz"
        a, b = load(tmp_path / "one" / name), load(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        assert a["keys"].tolist() == b["keys"].tolist() and a["labels"].tolist() == b["labels"].tolist()
        for name in a:
            if a[name].dtype.kind == "f":
                np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)

