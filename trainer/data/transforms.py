"""Decoding and augmentation of one sample, on uint8 tensors.

Images leave the loader as uint8 [3, H, W]: a quarter of the bytes of float32 through the worker
queues and the host-to-device copy. Scaling and normalisation happen on the device (`Normalize`),
as in timm's prefetcher and NVIDIA's DALI pipelines. Decoding uses `torchvision.io`, which decodes
JPEG about 1.5x faster than PIL on our CPUs (field notes).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

# members that may hold the image, in the order they are looked for (shards.build writes jpg/png/webp)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "gif")
AUGMENTS = ("none", "trivialaugment", "colorjitter")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision 0.29 marks torchvision.io's decoders deprecated in favour of TorchCodec and warns on every
# call; they remain the fastest CPU decoders installed here, and one warning per image floods the logs
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class BadSample(ValueError):
    """This sample cannot be used (undecodable image, missing or invalid label)."""


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    augment: str = "none"
    color_jitter: float = 0.4
    # eval: resize the short side to crop_size / eval_crop_ratio, then centre-crop (0.875 = 224/256)
    eval_crop_ratio: float = 0.875


def decode(sample: dict, num_classes: int, labelled: bool = True) -> tuple[Tensor, int]:
    """(uint8 [3, H, W], label) from a raw WebDataset sample; `BadSample` says what is wrong.

    `labelled=False` (prediction) accepts a sample without `.cls`; its label is then -1."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample(f"no image member (have {sorted(k for k in sample if not k.startswith('__'))})")
    label = -1 if not labelled and sample.get("cls") is None else parse_label(sample.get("cls"), num_classes)
    return decode_bytes(sample[key], f".{key}"), label


def decode_bytes(data: bytes, what: str) -> Tensor:
    """uint8 [3, H, W] RGB from encoded image bytes; `BadSample` names `what` when they do not decode.

    An animated GIF gives its first frame and a 16-bit PNG is scaled to 8 bits: what `shards.build`
    stores for them, and what the models are trained on."""
    if not data:
        raise BadSample(f"empty {what} (0 bytes)")
    try:
        # bytearray: frombuffer needs a writable buffer; the copy is a few KB
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise BadSample(f"undecodable {what}: {str(err).splitlines()[0][:200]}") from err
    if image.ndim == 4:
        image = image[0]
    return v2.functional.to_dtype(image, torch.uint8, scale=True) if image.dtype != torch.uint8 else image


def parse_label(raw: bytes | None, num_classes: int) -> int:
    """The class index in a `.cls` member (ASCII digits); `BadSample` when missing or out of range."""
    if raw is None:
        raise BadSample("no .cls member")
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise BadSample(f".cls is not an integer: {raw[:20]!r}") from err
    if not 0 <= label < num_classes:
        raise BadSample(f".cls {label} outside [0, {num_classes})")
    return label


def train_transform(cfg: AugmentConfig) -> Callable[[Tensor], Tensor]:
    steps: list[nn.Module] = [v2.RandomResizedCrop(cfg.crop_size, scale=cfg.scale, ratio=cfg.ratio,
                                                   antialias=True)]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif cfg.augment == "colorjitter":
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    elif cfg.augment != "none":
        raise ValueError(f"data.augment must be one of {AUGMENTS}, got {cfg.augment!r}")
    return v2.Compose(steps)


def eval_transform(cfg: AugmentConfig) -> Callable[[Tensor], Tensor]:
    resize = round(cfg.crop_size / cfg.eval_crop_ratio)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(cfg.crop_size)])


class Normalize(nn.Module):
    """uint8 NCHW batch -> normalised float on the device, optionally channels_last."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: Tensor) -> Tensor:
        x = images.to(self.mean.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return (x.float() - self.mean) / self.std
