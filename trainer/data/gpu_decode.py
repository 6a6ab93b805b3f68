"""The `torchvision-gpu` backend: workers read JPEG bytes, the training process decodes on the GPU.

For clusters without DALI. DataLoader workers do what is cheap on a CPU (read the shards, shuffle,
parse labels, read each JPEG's header) and the training process decodes a whole batch at once with
nvJPEG (`torchvision.io.decode_jpeg(list, device="cuda")`) and augments each image on the GPU. The
loop fetches the next batch before its per-step stop agreement waits for the GPU, so decoding batch
n+1 can overlap step n's kernels (not yet measured on a GPU).

Same contract and same semantics as the `webdataset` backend, because it reuses its stream: the same
shard deal, shuffle, steps per rank, resume position, bootstrap and `data.fraction` subsets, and the
same per-sample seed for the augmentation. The transforms draw their random parameters from the CPU
generator whatever the image's device, so a sample gets the same crop and flip here as there
(on a CPU device the batches are bitwise the same; tested).

What the GPU cannot do goes to the CPU, never silently away:
- non-JPEG members (PNG, WebP, ...), and JPEGs that are not RGB or greyscale (CMYK), are decoded and
  augmented in the worker, as in the `webdataset` backend;
- a member whose header does not parse, or a bad label, is replaced in the worker by the next sample
  and reported in `Batch.bad`, as in the `webdataset` backend;
- a JPEG that nvJPEG rejects is retried with the CPU decoder; one that fails there too is reported in
  `Batch.bad` and its place in the batch is taken by a copy of another sample of the batch (the
  batch size, and so the step count, must not change), counted against `data.max_bad_fraction`.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from PIL import JpegImagePlugin, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from trainer.data.streams import (
    BadCounter,
    BadRecord,
    Batch,
    DataError,
    EpochPosition,
    ShardLoader,
    TrainStream,
    seeded,
)
from trainer.data.transforms import BadSample, check_pixels, decode_bytes, image_kind, parse_label

JPEG_KEYS = ("jpg", "jpeg")
GPU_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG decodes to RGB; CMYK/YCCK go to the CPU


class Jpeg(NamedTuple):
    data: bytes
    seed: int
    name: str  # "shard/key", for messages


class RawBatch(NamedTuple):
    """A training batch with its JPEGs still encoded; what the workers send to the training process."""

    jpegs: Tensor               # uint8: the batch's JPEG files back to back
    lengths: Tensor             # int64 [n]: their sizes
    jpeg_slots: Tensor          # int64 [n]: their places in the batch
    seeds: Tensor               # int64 [n]: their augmentation seeds
    names: tuple[str, ...]      # "shard/key" of each
    images: Tensor              # uint8 [m, 3, H, W]: decoded and augmented in the worker
    image_slots: Tensor         # int64 [m]
    labels: Tensor              # int64 [n + m]
    bad: tuple[BadRecord, ...]
    worker: int
    consumed: int


def gpu_decodable(data: bytes) -> bool:
    """Whether nvJPEG can take this member: a JPEG in RGB or greyscale (reads the header only).

    `BadSample` when the header does not parse: the worker replaces the sample, as a decode error would."""
    if image_kind(data) != "jpg":
        return False  # decoded in the worker, through the CPU path's own checks
    try:
        with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as im:  # the header only, no bomb check
            size, mode = im.size, im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadSample(f"unreadable image header: {err}") from err
    check_pixels(size, "image")  # nvJPEG would allocate whatever the header asks for
    return mode in GPU_MODES


class RawStream(TrainStream):
    """`TrainStream` whose workers leave JPEGs encoded for the GPU and do everything else as before."""

    def _prepare(self, sample: dict, seed: int) -> tuple[Jpeg | Tensor, int]:
        key = next((k for k in JPEG_KEYS if k in sample), None)
        if key is None or not sample[key] or not gpu_decodable(sample[key]):
            return super()._prepare(sample, seed)  # decoded and augmented here, with the same seed
        label = parse_label(sample.get("cls"), self.num_classes)
        return Jpeg(sample[key], seed, f"{sample['__shard__']}/{sample['__key__']}"), label

    def _assemble(self, items: list, labels: Tensor, bad: tuple[BadRecord, ...], logical: int,
                  position: int) -> RawBatch:
        jpeg_slots = [i for i, item in enumerate(items) if isinstance(item, Jpeg)]
        image_slots = [i for i, item in enumerate(items) if not isinstance(item, Jpeg)]
        jpegs = [items[i] for i in jpeg_slots]
        # one flat tensor: a batch's JPEGs cross to the training process as one shared-memory block
        flat = torch.frombuffer(bytearray(b"".join(j.data for j in jpegs)), dtype=torch.uint8) if jpegs \
            else torch.empty(0, dtype=torch.uint8)
        images = torch.stack([items[i] for i in image_slots]) if image_slots \
            else torch.empty(0, dtype=torch.uint8)
        def ints(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64)

        return RawBatch(flat, ints([len(j.data) for j in jpegs]), ints(jpeg_slots),
                        ints([j.seed for j in jpegs]), tuple(j.name for j in jpegs), images,
                        ints(image_slots), labels, bad, logical, position)


class GpuDecodeLoader:
    """`epoch(e, position)` -> exactly `batches_per_epoch` batches, already on `device`."""

    def __init__(self, stream: RawStream, workers: int, device: torch.device | str,
                 pin_memory: bool = False, prefetch: int = 2, persistent: bool = True) -> None:
        self.inner = ShardLoader(stream, workers, pin_memory, prefetch, persistent)
        self.transform: Callable[[Tensor], Tensor] = stream.transform
        self.device = torch.device(device)
        self.shards, self.max_bad = stream.shards, stream.cfg.max_bad_fraction
        self.batches_per_epoch = stream.batches_per_epoch

    def epoch(self, epoch: int, position: EpochPosition | None = None) -> Iterator[Batch]:
        counter = BadCounter(self.shards, self.max_bad)
        for raw in self.inner.epoch(epoch, position):
            yield self.finish(raw, counter)

    def close(self) -> None:
        self.inner.close()

    def finish(self, raw: RawBatch, counter: BadCounter) -> Batch:
        size = len(raw.labels)
        images: list[Tensor | None] = [None] * size
        for slot, image in zip(raw.image_slots.tolist(), raw.images, strict=True):
            images[slot] = image.to(self.device, non_blocking=True)
        blobs = list(torch.split(raw.jpegs, raw.lengths.tolist()))
        bad = list(raw.bad)
        for slot, seed, name, image in zip(raw.jpeg_slots.tolist(), raw.seeds.tolist(), raw.names,
                                           self.decode(blobs, raw.names), strict=True):
            if isinstance(image, BadSample):
                shard, key = name.split("/", 1)
                bad.append(BadRecord(shard, key, str(image)))
                counter.add(bad[-1])
            else:
                images[slot] = seeded(self.transform, image, seed)
        labels = raw.labels.clone()
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise DataError(f"no image of a batch decoded (latest: {bad[-1].shard}/{bad[-1].key}: "
                            f"{bad[-1].reason})")
        for i, slot in enumerate(i for i in range(size) if images[i] is None):
            twin = good[i % len(good)]  # keep the batch full: the step count must not change
            images[slot], labels[slot] = images[twin], labels[twin]
        return Batch(torch.stack(images), labels.to(self.device, non_blocking=True), tuple(bad), raw.worker,
                     raw.consumed)

    def decode(self, blobs: list[Tensor], names: tuple[str, ...]) -> list[Tensor | BadSample]:
        """RGB uint8 [3, H, W] on the device per blob; one nvJPEG call for the batch, one by one on error."""
        if not blobs:
            return []
        try:
            return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device))
        except (RuntimeError, ValueError):
            return [self.decode_one(blob, name) for blob, name in zip(blobs, names, strict=True)]

    def decode_one(self, blob: Tensor, name: str) -> Tensor | BadSample:
        try:
            return decode_jpeg(blob, mode=ImageReadMode.RGB, device=self.device)
        except (RuntimeError, ValueError):
            pass
        try:  # libjpeg-turbo accepts some files nvJPEG refuses
            return decode_bytes(blob.numpy().tobytes(), f"{name}.jpg").to(self.device)
        except BadSample as err:
            return err

