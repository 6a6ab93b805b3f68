"""The `torchvision-gpu` backend: the `webdataset` backend's batches, decoded in the training process.

On a CPU device (`GpuDecodeLoader(device="cpu")`, the same code path with libjpeg-turbo standing in
for nvJPEG) the batches must be bitwise those of the `webdataset` backend; the GPU test checks nvJPEG.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import config, train
from train_fixtures import final_state, write_shardset

from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.gpu_decode import GpuDecodeLoader, RawStream, gpu_decodable
from trainer.data.streams import StreamConfig
from trainer.data.transforms import AugmentConfig, BadSample, train_transform
from trainer.runtime.exits import ConfigError

SIZES = {"train": [13, 7, 20, 8, 11], "val": [6]}  # 59 samples, uneven shards
AUG = AugmentConfig(crop_size=16, scale=(0.3, 1.0))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """JPEG, PNG and CMYK JPEG samples: nvJPEG's share, and what stays on the CPU."""
    return write_shardset(tmp_path_factory.mktemp("gpudecode") / "s", SIZES, image_size=24,
                          image_format="mixed")


def loaders(root: Path, rank: int, world: int, workers: int, aug: AugmentConfig = AUG, max_bad: float = 0.01,
            device: str = "cpu") -> tuple[data.ShardLoader, GpuDecodeLoader]:
    split = shardset.load(root, "train")
    bpe = data.steps_per_epoch(split.num_samples, 4, world, 1)
    cfg = StreamConfig(4, 7, 16, 4, max_bad)
    args = (split, train_transform(aug), cfg, rank, world, workers, bpe)
    return (data.ShardLoader(data.TrainStream(*args), workers),
            GpuDecodeLoader(RawStream(*args), workers, device))


def class_of(images: torch.Tensor) -> list[int]:
    return images.float().mean(dim=(2, 3)).argmax(dim=1).tolist()


def test_the_fixture_mixes_gpu_and_cpu_decoding(mixed):
    kinds = {"png": 0, "gpu": 0, "cpu": 0}
    for shard in shardset.load(mixed, "train").shards:
        for sample in data.read_shard(shard):
            kinds["png" if "png" in sample else "gpu" if gpu_decodable(sample["jpg"]) else "cpu"] += 1
    assert all(n > 0 for n in kinds.values()), kinds  # PNG and CMYK JPEG go to the CPU
    with pytest.raises(BadSample, match="header"):
        gpu_decodable(b"\xff\xd8\xff" + bytes(64))


@pytest.mark.parametrize("augment", ["none", "colorjitter"])
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_batches_are_bitwise_the_webdataset_backends(mixed, world, workers, augment):
    aug = AugmentConfig(crop_size=16, scale=(0.3, 1.0), augment=augment)
    for rank in range(world):
        reference, ours = loaders(mixed, rank, world, workers, aug)
        assert ours.batches_per_epoch == reference.batches_per_epoch
        for epoch in (0, 1):
            want, got = list(reference.epoch(epoch)), list(ours.epoch(epoch))
            assert len(got) == len(want) == reference.batches_per_epoch
            for a, b in zip(want, got, strict=True):
                assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
                assert (a.worker, a.consumed) == (b.worker, b.consumed)  # the same resume position
                assert b.labels.tolist() == class_of(b.images)


def test_resume_mid_epoch_continues_as_the_uninterrupted_epoch(mixed):
    _, ours = loaders(mixed, 0, 1, 2)
    full = list(ours.epoch(3))
    position = data.EpochPosition()
    for batch in full[:5]:
        position.advance(batch, 2)
    rest = list(ours.epoch(3, position))
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a.images, b.images) for a, b in zip(full[5:], rest, strict=True))


@pytest.mark.parametrize(("size", "reason", "where"),
                         [(24, "header", "worker"), (64, "truncated", "decoder")])
def test_bad_jpegs_are_reported_and_the_batch_stays_full(tmp_path, size, reason, where):
    # cut in half, a small JPEG loses its header (the worker replaces it by the next sample, as the
    # webdataset backend does); a larger one keeps it and only the decoder in the training process
    # rejects it (a copy of another sample of the batch takes its place)
    root = write_shardset(tmp_path / "s", {"train": [20, 20]}, corrupt={("train", 1): [2, 9]},
                          image_format="jpg", image_size=size)
    reference, ours = loaders(root, 0, 1, 2, max_bad=0.2)
    seen = set()
    for epoch in range(3):
        want, got = list(reference.epoch(epoch)), list(ours.epoch(epoch))
        assert len(got) == len(want) and all(len(b.labels) == 4 for b in got)
        bad = [r for b in got for r in b.bad]
        assert sorted(r.key for r in bad) == sorted(r.key for b in want for r in b.bad)
        assert all(r.shard == "train-000001.tar" and reason in r.reason for r in bad), bad
        # nothing lost silently: every sample taken is either batched or reported
        taken = sum(max(b.consumed for b in got if b.worker == w) for w in (0, 1))
        assert taken == 4 * len(got) + (len(bad) if where == "worker" else 0)
        assert all(b.labels.tolist() == class_of(b.images) for b in got)
        seen.update(r.key.split("-")[0] for r in bad)
    assert seen == {"train1_0002", "train1_0009"}


def test_too_many_bad_jpegs_stop_with_the_shard_named(tmp_path):
    # 64 px: the headers survive the cut, so it is the training process's count that stops the run
    root = write_shardset(tmp_path / "s", {"train": [20, 20]}, corrupt={("train", 1): [1, 2, 3]},
                          image_format="jpg", image_size=64)
    _, ours = loaders(root, 0, 1, 0, max_bad=0.1)
    with pytest.raises(data.DataError, match=r"train-000001.tar: 3 of its 20 samples .*max_bad_fraction=0.1"):
        list(ours.epoch(0))


def test_the_trainer_refuses_it_without_a_gpu(mixed, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for CPU-only machines")
    with pytest.raises(ConfigError, match="loader.backend=torchvision-gpu .* CUDA"):
        train(config(mixed, tmp_path / "r", "loader.backend=torchvision-gpu", "trainer.max_steps=2"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_decodes_onto_the_gpu_with_the_cpu_crops_and_trains(mixed, tmp_path):
    reference, ours = loaders(mixed, 0, 1, 2, device="cuda")
    for a, b in zip(reference.epoch(0), ours.epoch(0), strict=True):
        assert b.images.is_cuda and b.images.dtype == torch.uint8 and b.images.shape == a.images.shape
        assert torch.equal(b.labels.cpu(), a.labels)
        # nvJPEG's IDCT differs from libjpeg-turbo's by a few levels; the crop and flip must be the same
        assert (b.images.cpu().float() - a.images.float()).abs().mean() < 4
    assert train(config(mixed, tmp_path / "g", "loader.backend=torchvision-gpu", "trainer.max_steps=4")) == 0
    assert final_state(tmp_path / "g")["step"] == 4
