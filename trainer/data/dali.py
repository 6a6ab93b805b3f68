"""The `dali` backend: NVIDIA DALI reads the shards with their index files and decodes + augments.

Same contract as `trainer/data.py`'s loaders: `batches_per_epoch` is the same on every rank and
`epoch(e, position)` yields exactly that many `Batch`es of uint8 [B, 3, crop, crop] images and int64
labels. `loader.dali.device=cpu` runs everywhere (DALI with `device_id=None`, no GPU needed);
`loader.dali.device=gpu` decodes with nvJPEG ("mixed") and augments on the GPU, and its batches are
already on this rank's GPU.

How it keeps the contract, and where it differs from the `webdataset` backend:
- `fn.readers.webdataset` splits the split's samples into `world` contiguous ranges, one per global
  rank (`shard_id` = global rank; DALI's own ResNet example uses the local rank, which duplicates data
  across nodes). Its reader never ends: each rank simply runs its pipeline `batches_per_epoch` times,
  so every rank takes the same number of steps whatever the shard sizes.
- Shuffling is DALI's: a buffer of `data.shuffle_buffer` samples over the rank's range, seeded from
  (trainer seed, rank). The order is reproducible but not the webdataset backend's order.
- Augmentation is the same recipe (`decoders.image_random_crop` with the same scale and ratio ranges,
  resize to the crop, horizontal flip with probability `data.hflip`); `data.augment` policies
  (TrivialAugment, colour jitter) are not available in DALI and are refused at start, as is the
  plankton geometry (`data.resize=letterbox`, `data.vflip`, `data.rot90`; the `torchvision-gpu`
  backend has it).
- A sample that does not decode stops the run with an error that says so; the `webdataset` backend
  skips and reports such samples. Shards built by `shards.build` are fully decoded at build time.
- Resume continues with a fresh pipeline for the remaining batches of the epoch: the run resumes
  exactly where its step count stopped, but the data order after a resume is not bitwise the same
  as without the stop (the `webdataset` backend's is).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from shards.keys import stable_hash
from shards.writer import index_path
from trainer.data.shardset import ShardSet
from trainer.data.streams import Batch, DataError, EpochPosition
from trainer.data.transforms import AugmentConfig, BadSample, parse_label
from trainer.runtime.exits import ConfigError

INSTALL = ("DALI is not installed: pip install 'taxotrain[dali]' (nvidia-dali-cuda130; other CUDA "
           "versions: https://docs.nvidia.com/deeplearning/dali), or use loader.backend=webdataset")
IMAGE_EXTS = "jpg;jpeg;png;webp;bmp;tif;tiff"


def available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


@dataclass(frozen=True)
class DaliOptions:
    device: str = "cpu"          # cpu | gpu
    threads: int = 4             # DALI CPU worker threads per rank
    prefetch: int = 2            # batches DALI prepares ahead
    shuffle_buffer: int = 1000
    device_id: int | None = None  # the rank's GPU for device=gpu


class DaliLoader:
    def __init__(self, shardset: ShardSet, aug: AugmentConfig, batch_size: int, rank: int, world: int,
                 batches_per_epoch: int, seed: int, options: DaliOptions) -> None:
        if not available():
            raise ConfigError(INSTALL)
        if options.device == "gpu" and options.device_id is None:
            raise ConfigError("loader.dali.device=gpu needs a CUDA device on this rank")
        self.shardset, self.aug, self.batch_size = shardset, aug, batch_size
        self.rank, self.world, self.seed, self.options = rank, world, seed, options
        self.batches_per_epoch = batches_per_epoch
        missing = [str(index_path(s.path)) for s in shardset.shards if not index_path(s.path).is_file()]
        if missing:
            raise DataError(f"DALI needs the index file of every shard; missing: {missing[:3]} (shards.build "
                            "writes them; `wds2idx` from the DALI wheel makes them for other tars)")
        self.pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        a, o = self.aug, self.options
        paths = [str(s.path) for s in self.shardset.shards]
        indexes = [str(index_path(s.path)) for s in self.shardset.shards]
        seed = stable_hash("dali", self.seed, self.rank) & 0x7FFF_FFFF

        @pipeline_def(batch_size=self.batch_size, num_threads=o.threads, device_id=o.device_id,
                      prefetch_queue_depth=o.prefetch, seed=seed)
        def pipeline():
            encoded, cls = fn.readers.webdataset(
                paths=paths, index_paths=indexes, ext=[IMAGE_EXTS, "cls"],
                missing_component_behavior="error", shard_id=self.rank, num_shards=self.world,
                random_shuffle=True, initial_fill=o.shuffle_buffer, name="reader")
            images = fn.decoders.image_random_crop(
                encoded, device="mixed" if o.device == "gpu" else "cpu", output_type=types.RGB,
                random_area=list(a.scale), random_aspect_ratio=list(a.ratio), num_attempts=10)
            images = fn.resize(images, resize_x=a.crop_size, resize_y=a.crop_size, antialias=True)
            flip = fn.random.coin_flip(probability=a.hflip) if a.hflip > 0 else 0
            # uint8 CHW like the other backends; normalisation happens on the device in the trainer
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=flip,
                                              mean=[0.0], std=[1.0])
            return images, cls

        pipe = pipeline()
        pipe.build()
        return pipe

    def epoch(self, epoch: int, position: EpochPosition | None = None) -> Iterator[Batch]:
        start = position.batches if position else 0
        if self.pipe is None or start:  # one pipeline for the run; a fresh one after a resume
            self.pipe = self._build()
        for i in range(start, self.batches_per_epoch):
            try:
                images, cls = self.pipe.run()
            except RuntimeError as err:
                raise DataError(f"DALI failed reading {self.shardset.root} ({self.shardset.split}): "
                                f"{str(err).splitlines()[0][:300]}; check the shards with "
                                "`python -m shards.verify decode=true`") from err
            yield Batch(self._images(images), self._labels(cls), (), 0, (i + 1) * self.batch_size)

    def close(self) -> None:
        """Drops the pipeline (its reader and decoder threads); the next `epoch()` builds a new one."""
        self.pipe = None

    def _images(self, images) -> torch.Tensor:
        if self.options.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = images.as_tensor()
            out = torch.empty(dense.shape(), dtype=torch.uint8, device=f"cuda:{self.options.device_id}")
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device))
            return out
        return torch.from_numpy(np.array(images.as_array()))  # a copy: DALI reuses its buffers

    def _labels(self, cls) -> torch.Tensor:
        try:
            labels = [parse_label(cls.at(i).tobytes(), self.shardset.num_classes) for i in range(len(cls))]
        except BadSample as err:
            raise DataError(f"{self.shardset.root} ({self.shardset.split}): {err}") from err
        return torch.tensor(labels, dtype=torch.int64)
