"""The shard loader contract: equal steps per rank, every validation sample once, exact resume,
bad samples counted and bounded, clear errors before any hang."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import run_build
from train_fixtures import write_shardset

from shards.config import ImageFolderSource, ShardSizeConfig
from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.streams import DataError, EpochPosition, StreamConfig
from trainer.data.transforms import AugmentConfig, eval_transform, train_transform

UNEVEN = {"train": [37, 5, 22, 3, 30, 11, 2, 19], "val": [13, 4, 9]}
AUG = AugmentConfig(crop_size=12, scale=(0.3, 1.0))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return write_shardset(tmp_path_factory.mktemp("uneven"), UNEVEN)


def train_loader(root: Path, rank: int, world: int, workers: int, batch: int = 4, seed: int = 0,
                 max_bad: float = 0.01) -> data.ShardLoader:
    split = shardset.load(root, "train")
    bpe = data.steps_per_epoch(split.num_samples, batch, world, 1)
    stream = data.TrainStream(split, train_transform(AUG), StreamConfig(batch, seed, 16, 4, max_bad),
                              rank, world, workers, bpe)
    return data.ShardLoader(stream, workers)





# ---------------------------------------------------------------- planning


def test_steps_per_epoch_counts_whole_global_batches():
    assert data.steps_per_epoch(129, 4, 2, 1) == 16
    assert data.steps_per_epoch(129, 4, 2, 2) == 8
    with pytest.raises(DataError, match="loader.batch_size"):
        data.steps_per_epoch(7, 4, 2, 1)


def test_shard_order_depends_on_seed_and_epoch_only():
    assert data.shard_order(50, 3, 7) == data.shard_order(50, 3, 7)
    assert data.shard_order(50, 3, 7) != data.shard_order(50, 3, 8)
    assert data.shard_order(50, 3, 7) != data.shard_order(50, 4, 7)
    assert sorted(data.shard_order(50, 3, 7)) == list(range(50))


def test_deal_balances_and_uses_every_shard_once():
    lengths = UNEVEN["train"]
    dealt = data.deal(lengths, data.shard_order(len(lengths), 0, 0), 4)
    assert sorted(i for slot in dealt for i in slot) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in slot) for slot in dealt]
    assert max(totals) - min(totals) <= max(lengths)


def test_fewer_shards_than_readers_is_an_error_that_says_what_to_do(tmp_path):
    # without index files: with them, readers share shards by sample ranges (test_sample_ranges.py)
    unindexed = write_shardset(tmp_path / "s", {"train": UNEVEN["train"]}, index=False)
    with pytest.raises(DataError, match=r"8 shards cannot feed 9 readers .*loader.workers.*index files"):
        train_loader(unindexed, rank=0, world=3, workers=3)


def test_quotas_differ_by_at_most_one_larger_first():
    assert data.quotas(10, 4) == [3, 3, 2, 2]
    assert sum(data.quotas(10, 4)) == 10


# ---------------------------------------------------------------- training stream


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (2, 2), (3, 2)])
def test_every_rank_yields_exactly_the_same_number_of_full_batches(uneven, world, workers):
    total = sum(UNEVEN["train"])
    expected = total // (4 * world)
    for epoch in (0, 1):
        for rank in range(world):
            batches = list(train_loader(uneven, rank, world, workers).epoch(epoch))
            assert len(batches) == expected
            assert all(b.images.shape == (4, 3, 12, 12) and b.images.dtype == torch.uint8 for b in batches)
            assert all(b.labels.dtype == torch.int64 and len(b.labels) == 4 for b in batches)


def test_epoch_is_reproducible_and_changes_between_epochs(uneven):
    a = list(train_loader(uneven, 0, 2, 2).epoch(3))
    b = list(train_loader(uneven, 0, 2, 2).epoch(3))
    c = list(train_loader(uneven, 0, 2, 2).epoch(4))
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    assert not all(torch.equal(x.images, y.images) for x, y in zip(a, c))


def test_augmentation_differs_across_ranks_and_workers_and_seeds(uneven):
    # the same sample seen through different (seed, rank, worker) gets different crops
    flat = {}
    for seed in (0, 1):
        for rank in (0, 1):
            for b in train_loader(uneven, rank, 2, 2, seed=seed).epoch(0):
                flat[(seed, rank, b.worker)] = b.images
    values = list(flat.values())
    assert all(not torch.equal(values[i], values[j]) for i in range(len(values)) for j in range(i))


@pytest.mark.parametrize(("workers", "stop"), [(0, 3), (2, 5), (2, 6), (3, 4)])
def test_resume_mid_epoch_continues_bitwise(uneven, workers, stop):
    full = list(train_loader(uneven, 1, 2, workers).epoch(2))
    position = EpochPosition()
    for batch in full[:stop]:
        position.advance(batch, max(1, workers))
    rest = list(train_loader(uneven, 1, 2, workers).epoch(2, position))
    assert len(rest) == len(full) - stop
    for a, b in zip(full[stop:], rest):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_resume_with_other_worker_count_finishes_the_epoch(uneven):
    loader = train_loader(uneven, 0, 1, 3)
    rest = list(loader.epoch(0, EpochPosition(batches=5, offset=5)))
    assert len(rest) == loader.batches_per_epoch - 5


def test_corrupt_samples_are_replaced_and_reported(tmp_path):
    root = write_shardset(tmp_path / "s", {"train": [20, 20, 20, 20]}, corrupt={("train", 2): [3, 11]})
    loader = train_loader(root, 0, 1, 2, max_bad=0.2)
    bad = []
    for epoch in range(4):  # the shuffle buffer leaves a few samples for later epochs
        batches = list(loader.epoch(epoch))
        assert len(batches) == 20 and all(len(b.labels) == 4 for b in batches)
        epoch_bad = [r for b in batches for r in b.bad]
        # nothing is lost silently: samples taken from the stream = good ones batched + bad ones reported
        taken = sum(max(b.consumed for b in batches if b.worker == w) for w in (0, 1))
        assert taken == 80 + len(epoch_bad)
        bad += epoch_bad
    assert {r.shard for r in bad} == {"train-000002.tar"}
    assert {r.key.split("-")[0] for r in bad} == {"train2_0003", "train2_0011"}
    assert all("undecodable .png" in r.reason for r in bad)


def test_too_many_corrupt_samples_stop_with_the_shard_named(tmp_path):
    root = write_shardset(tmp_path / "s", {"train": [20, 20]}, corrupt={("train", 1): [1, 2, 3]})
    with pytest.raises(DataError, match=r"train-000001.tar: 3 of its 20 samples .*max_bad_fraction=0.1"):
        list(train_loader(root, 0, 1, 0, max_bad=0.1).epoch(0))


@pytest.mark.parametrize("index", [True, False])
def test_truncated_shard_is_named(tmp_path, index):
    root = write_shardset(tmp_path / "s", {"train": [20, 20]})
    if not index:  # the tar is scanned instead of read at the index's offsets
        (root / "train-000001.idx").unlink()
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    problems = shardset.check(shardset.load(root, "train").shards, "size")
    assert len(problems) == 1 and "train-000001.tar" in problems[0] and "bytes" in problems[0]
    with pytest.raises(DataError, match="train-000001.tar"):
        for _ in range(5):  # reading it (check off) fails naming the shard, not silently short
            list(train_loader(root, 0, 1, 0, batch=2).epoch(0))


def test_indexed_reading_gives_the_scanned_samples_and_names_a_stale_index(tmp_path, image_folder):
    built = tmp_path / "built"  # shards.build's own index files, and the fixtures'
    run_build(built, ImageFolderSource(root=str(image_folder)), shard=ShardSizeConfig(maxcount=4))
    fixture = write_shardset(tmp_path / "s", {"train": [20, 7]}, features=("area",))
    for root in (built, fixture):
        for shard in shardset.load(root, "train").shards:
            indexed = list(data.read_shard(shard))
            index = shard.path.with_suffix(".idx")
            text = index.read_text()
            index.unlink()
            assert indexed == list(data.read_shard(shard))  # keys, every member's bytes, url, shard
            index.write_text(text)
    shard = shardset.load(fixture, "train").shards[0]
    index = fixture / "train-000000.idx"
    lines = index.read_text().splitlines()
    ext, offset, rest = lines[2].split(" ", 2)
    index.write_text("\n".join([*lines[:2], f"{ext} {int(offset) + 512} {rest}", *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=r"train-000000.tar: no member .*idx, line 3\).*stale index"):
        list(data.read_shard(shard))
    for bad in ("png 512", "png x 3 a.png"):
        index.write_text(f"v1.2 1\n{bad}\n")
        with pytest.raises(DataError, match="train-000000.idx:2: expected groups of 'ext offset size name'"):
            list(data.read_shard(shard))


def test_checksum_check_names_a_flipped_byte(tmp_path):
    root = write_shardset(tmp_path / "s", {"train": [20, 20]})
    shard = root / "train-000000.tar"
    blob = bytearray(shard.read_bytes())
    blob[700] ^= 1
    shard.write_bytes(bytes(blob))
    shards = shardset.load(root, "train").shards
    assert shardset.check(shards, "size") == []
    assert "train-000000.tar: sha256" in shardset.check(shards, "sha256")[0]
    assert shardset.check(shards, "off") == []


def test_missing_split_and_manifest_are_named(tmp_path, uneven):
    with pytest.raises(shardset.ShardSetError, match=r"no split 'test'; present: \['train', 'val'\]"):
        shardset.load(uneven, "test")
    with pytest.raises(shardset.ShardSetError, match="_info.json"):
        shardset.load(tmp_path, "train")


# ---------------------------------------------------------------- evaluation and synthetic


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (4, 1)])
def test_validation_sees_every_sample_exactly_once(uneven, world, workers):
    split = shardset.load(uneven, "val")
    seen = Counter()
    for rank in range(world):
        stream = data.EvalStream(split, eval_transform(AUG), 5, rank, world, workers, 0.01)
        for batch in data.eval_batches(stream, workers):
            seen.update(batch.labels.tolist())
            assert batch.images.shape[1:] == (3, 12, 12)
    assert sum(seen.values()) == sum(UNEVEN["val"])
    assert seen == Counter(i % 3 for i in range(sum(UNEVEN["train"]), sum(UNEVEN["train"]) + 26))


def test_synthetic_backend_keeps_the_contract():
    loader = data.SyntheticLoader(100, 10, 8, 32, 12, seed=0, rank=1)
    batches = list(loader.epoch(0))
    assert len(batches) == 12 and batches[0].images.dtype == torch.uint8
    assert batches[0].images.shape == (8, 3, 32, 32)
    assert len(list(loader.epoch(0, EpochPosition(batches=5)))) == 7


def test_decode_bytes_gives_8_bit_rgb_for_16_bit_png_and_animated_gif_and_names_empty_input():
    import io

    import numpy as np
    from PIL import Image

    from trainer.data.transforms import BadSample, decode_bytes

    deep = io.BytesIO()
    Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16)).save(deep, format="PNG")
    image = decode_bytes(deep.getvalue(), "x.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7) and int(image.min()) == 255
    gif = io.BytesIO()
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    first = decode_bytes(gif.getvalue(), "a.gif")
    assert first.shape == (3, 4, 6) and int(first[0].float().mean()) > 200  # the red first frame
    with pytest.raises(BadSample, match="empty a.jpg"):
        decode_bytes(b"", "a.jpg")
    with pytest.raises(BadSample, match="undecodable a.jpg"):
        decode_bytes(b"not an image", "a.jpg")
