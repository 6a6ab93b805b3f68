"""Sample-range readers (issue 18): with index files, readers are dealt ranges of samples within shards,
so a set with fewer shards than ranks x workers trains, with equal steps per rank, every validation
sample once and bitwise resume; without index files, too few shards stay a clear error."""
from __future__ import annotations

import math
from collections import Counter
from itertools import cycle, islice
from pathlib import Path

import pytest
import torch
from test_train import SMALL, config, spawn_ranks, train, wait_all
from train_fixtures import (
    assert_same_training_state,
    final_state,
    metrics,
    record_index_digests,
    write_shardset,
)

from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.shardset import Shard
from trainer.data.streams import DataError, EpochPosition, StreamConfig
from trainer.data.transforms import AugmentConfig, decode, eval_transform, train_transform
from trainer.runtime.exits import EXIT_PREEMPTED

AUG = AugmentConfig(crop_size=12, scale=(0.3, 1.0))


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    return write_shardset(tmp_path_factory.mktemp("one"), {"train": [10], "val": [10]})


def stream_of(root: Path, rank: int, world: int, workers: int, batch: int, transform=None,
              buffer: int = 16, initial: int = 4, max_bad: float = 0.01) -> data.TrainStream:
    split = shardset.load(root, "train")
    bpe = data.steps_per_epoch(split.num_samples, batch, world, 1)
    return data.TrainStream(split, transform or train_transform(AUG),
                            StreamConfig(batch, 0, buffer, initial, max_bad), rank, world, workers, bpe)


def keys_by_image(root: Path, split: str) -> dict[bytes, str]:
    """Each sample's key by its decoded pixels (the fixture's images are distinct random noise)."""
    found = {}
    for shard in shardset.load(root, split).shards:
        for sample in data.read_shard(shard):
            image, _ = decode(sample, 3)
            found[image.numpy().tobytes()] = sample["__key__"]
    return found


def piece_keys(piece: data.Piece) -> list[str]:
    """The keys of a piece, read independently: the whole shard in tar order, then the range."""
    return [s["__key__"] for s in data.read_shard(piece.shard)][piece.first:piece.end]


# ---------------------------------------------------------------- the cut (pure)


def fake_shards(*lengths: int, indexed: bool = True) -> list[Shard]:
    """Shards that exist only in a manifest: `indexed` records an index digest, as shards.build does."""
    return [Shard(Path(f"/nowhere/train-{i:06d}.tar"), n, index_sha256="0" * 64 if indexed else None)
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("lengths", [[10], [9], [1, 1, 1, 7], [5, 5], [37, 5, 22], [3, 0, 4], [2, 2, 2]])
def test_pieces_cover_every_sample_once_and_are_enough_for_the_readers(lengths):
    total = sum(lengths)
    for slots in range(1, 13):
        shards = fake_shards(*lengths)
        pieces = data.pieces(shards, slots)
        assert pieces == data.pieces(fake_shards(*lengths), slots)  # a function of counts and slots
        if len(shards) >= slots:  # enough shards: whole ones, as before sample ranges existed
            assert pieces == [data.Piece(s, 0, s.num_samples) for s in shards]
            continue
        for shard in shards:  # each shard's ranges follow each other from 0 to its end, near-equal
            mine = [p for p in pieces if p.shard == shard]
            assert [(p.first, p.end) for p in mine] == list(zip([0, *[p.end for p in mine[:-1]]],
                                                                [p.end for p in mine]))
            assert (mine[-1].end if mine else 0) == shard.num_samples  # an empty shard has no piece
            sizes = [p.num_samples for p in mine]
            assert all(size >= 1 for size in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
        if total >= slots:
            assert len(pieces) >= slots
            assert max(p.num_samples for p in pieces) <= math.ceil(total / slots)
        else:  # one sample a piece: too few for the training readers (refused there), fine for evaluation
            assert len(pieces) == total


def test_without_an_index_for_every_shard_shards_stay_whole():
    assert all(p.whole for p in data.pieces(fake_shards(10, 4, indexed=False), 8))
    mixed = fake_shards(10) + fake_shards(4, indexed=False)
    assert all(p.whole for p in data.pieces(mixed, 8))


# ---------------------------------------------------------------- training


def test_one_shard_feeds_two_ranks_of_two_workers_reading_each_sample_as_expected(one_shard):
    # 10 samples, batch 1, 2 ranks -> 5 batches per rank, quotas 3 and 2 per worker. A shuffle buffer of
    # 1 keeps each reader's order, so what it reads is known: its pieces in order, again from the start
    # of its first piece when they run out, until its quota is met
    world, workers, batch = 2, 2, 1
    by_image = keys_by_image(one_shard, "train")
    every = sorted(by_image.values())
    for epoch in range(3):
        read, expected, dealt = Counter(), Counter(), []
        for rank in range(world):
            stream = stream_of(one_shard, rank, world, workers, batch, lambda image: image, 1, 1)
            batches = list(data.ShardLoader(stream, workers).epoch(epoch))
            assert len(batches) == stream.batches_per_epoch == 5  # the same on both ranks
            assert all(len(b.labels) == batch for b in batches)
            read.update(by_image[image.numpy().tobytes()] for b in batches for image in b.images)
            for logical, slot in enumerate(stream.slots):
                assert slot, "every reader has a piece"
                sequence = [k for i in slot for k in piece_keys(stream.pieces[i])]
                dealt += sequence
                need = data.quotas(stream.batches_per_epoch, workers)[logical] * batch
                expected.update(islice(cycle(sequence), need))
        assert sorted(dealt) == every  # the four readers' pieces hold every sample exactly once
        assert read == expected and sum(read.values()) == 10


def test_shuffled_and_augmented_ranges_keep_equal_full_batches(one_shard):
    for world, workers in [(2, 2), (1, 3), (3, 1)]:
        expected = 10 // (2 * world)
        for rank in range(world):
            batches = list(data.ShardLoader(stream_of(one_shard, rank, world, workers, 2), workers).epoch(1))
            assert len(batches) == expected
            assert all(b.images.shape == (2, 3, 12, 12) and len(b.labels) == 2 for b in batches)


@pytest.mark.parametrize(("rank", "stop"), [(0, 1), (0, 3), (1, 2), (1, 4)])
def test_resume_mid_epoch_over_ranges_continues_bitwise(one_shard, rank, stop):
    def loader() -> data.ShardLoader:
        return data.ShardLoader(stream_of(one_shard, rank, 2, 2, 1), 2)

    full = list(loader().epoch(2))
    assert any(not p.whole for p in loader().stream.pieces)  # ranges, not whole shards
    position = EpochPosition()
    for batch in full[:stop]:
        position.advance(batch, 2)
    rest = list(loader().epoch(2, position))
    assert len(rest) == len(full) - stop
    for a, b in zip(full[stop:], rest):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_bad_samples_count_against_the_readers_part_of_the_shard(tmp_path):
    # 3 bad samples in the first of 4 ranges of 5: 3/20 of the shard, but 3/5 of what its reader takes
    root = write_shardset(tmp_path / "s", {"train": [20]}, corrupt={("train", 0): [0, 1, 2]})
    with pytest.raises(DataError, match=r"train-000000.tar: 3 of the 5 of its 20 samples that one reader "
                                         r"takes are unusable, more than data.max_bad_fraction=0.5"):
        for rank in range(4):
            list(data.ShardLoader(stream_of(root, rank, 4, 0, 2, max_bad=0.5), 0).epoch(0))
    bad = Counter()
    for rank in range(4):
        for batch in data.ShardLoader(stream_of(root, rank, 4, 0, 2, max_bad=0.7), 0).epoch(0):
            assert len(batch.labels) == 2  # replaced by the next sample, the batch stays full
            bad.update(r.key.split("-")[0] for r in batch.bad)
    assert set(bad) == {"train0_0000", "train0_0001", "train0_0002"}


# ---------------------------------------------------------------- errors stay clear


def test_an_unindexed_set_with_too_few_shards_is_still_refused_saying_how_to_fix_it(tmp_path):
    root = write_shardset(tmp_path / "s", {"train": [10, 9]}, index=False)
    with pytest.raises(DataError, match=r"2 shards cannot feed 4 readers \(ranks x loader.workers\).*"
                                        r"shard.maxcount.*index files"):
        stream_of(root, 0, 2, 2, 2)


def test_too_few_samples_for_the_readers_names_loader_workers(tmp_path):
    root = write_shardset(tmp_path / "s", {"train": [3]})
    with pytest.raises(DataError, match="3 training samples cannot give each of 4 readers .*loader.workers"):
        stream_of(root, 0, 1, 4, 1)


def test_a_range_needs_its_index_and_an_index_that_agrees_with_the_manifest(tmp_path):
    root = record_index_digests(write_shardset(tmp_path / "s", {"train": [10]}))
    index = root / "train-000000.idx"
    text = index.read_text()
    index.unlink()  # the manifest still says the set is indexed: every rank cuts alike, the read fails
    stream = stream_of(root, 0, 4, 0, 1)
    with pytest.raises(DataError, match=r"train-000000.idx: missing; reading samples \d+-\d+ of train-0"):
        list(data.ShardLoader(stream, 0).epoch(0))
    lines = text.splitlines()
    index.write_text("\n".join(["v1.2 8", *lines[1:9]]) + "\n")  # two samples short
    with pytest.raises(DataError, match="train-000000.idx: lists 8 samples, the manifest says 10"):
        list(data.read_piece(data.Piece(shardset.load(root, "train").shards[0], 0, 3)))


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize(("sizes", "world", "workers"), [([10], 2, 2), ([1, 2, 7], 2, 3), ([10], 4, 0)])
def test_validation_over_ranges_sees_every_sample_exactly_once_and_spreads_the_work(tmp_path, sizes, world,
                                                                                     workers):
    root = write_shardset(tmp_path / "s", {"val": sizes})
    split = shardset.load(root, "val")
    expected = Counter(s["__key__"] for shard in split.shards for s in data.read_shard(shard))
    seen = Counter()
    for rank in range(world):
        stream = data.EvalStream(split, eval_transform(AUG), 3, rank, world, workers, 0.01)
        assert all(stream.slots), "no reader idles"
        for batch in data.eval_batches(stream, workers):
            seen.update(batch.keys)
            assert len(batch.keys) == len(batch.labels) == len(batch.images)
    assert seen == expected and set(seen.values()) == {1}


# ---------------------------------------------------------------- real runs


def test_a_training_on_one_shard_with_two_workers_resumes_bitwise(tmp_path):
    # 1 shard for 1 rank x 2 workers: 13 samples, batch 4 -> 3 steps per epoch; stop inside epoch 1
    root = write_shardset(tmp_path / "s", {"train": [13]})
    common = ["trainer.max_steps=5", "loader.workers=2", "data.val_split=null"]  # validation: the next test
    assert train(config(root, tmp_path / "a", *common)) == 0
    assert train(config(root, tmp_path / "b", *common, "trainer.stop_at_step=4")) == EXIT_PREEMPTED
    assert final_state(tmp_path / "b")["step"] == 4
    assert train(config(root, tmp_path / "b", *common, "trainer.stop_at_step=4")) == 0
    assert_same_training_state(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_two_gloo_ranks_of_two_workers_train_from_two_shards(tmp_path):
    # 2 training shards for 2 ranks x 2 workers and 1 validation shard: refused before sample ranges
    root = write_shardset(tmp_path / "s", {"train": [10, 9], "val": [7]})
    run = tmp_path / "r"
    args = [f"data.shards={root}", f"run_dir={run}", *SMALL, "loader.workers=2", "trainer.max_steps=4",
            "trainer.dist_timeout_s=60"]
    assert wait_all(spawn_ranks(args), 240) == [0, 0]
    # 19 samples, batch 4 x 2 ranks: 2 steps per epoch on both ranks (a rank short of one would hang)
    assert final_state(run)["step"] == 4 and final_state(run)["recipe"]["steps_per_epoch"] == 2
    val = [m for m in metrics(run) if m["split"] == "val"]
    assert [m["n"] for m in val] == [7, 7]  # every validation sample once across the 4 readers, 2 epochs
