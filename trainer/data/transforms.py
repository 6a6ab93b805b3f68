"""Decoding and augmentation of one sample, on uint8 tensors.

Images leave the loader as uint8 [3, H, W]: a quarter of the bytes of float32 through the worker
queues and the host-to-device copy. Scaling and normalisation happen on the device (`Normalize`),
as in timm's prefetcher and NVIDIA's DALI pipelines. JPEG and WebP are decoded by `torchvision.io`,
which decodes JPEG about 1.5x faster than PIL on our CPUs (field notes); PNG and GIF by PIL, because
torchvision's libpng error path kills the process (SIGSEGV) on a corrupt PNG (measured below). Every
image's size is read from its header before any decoder allocates for it.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin
from torch import Tensor, nn
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from shards.images import to_rgb

# members that may hold the image, in the order they are looked for (shards.build writes jpg/png/webp)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "gif")
AUGMENTS = ("none", "trivialaugment", "colorjitter")
RESIZES = ("crop", "letterbox")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# shards.build's default max_pixels (PIL's own bomb limit): nothing larger is stored, nothing larger decoded
MAX_PIXELS = 89_478_485
_HEADER_READERS = {"jpg": JpegImagePlugin.JpegImageFile, "png": PngImagePlugin.PngImageFile,
                   "gif": GifImagePlugin.GifImageFile, "webp": WebPImagePlugin.WebPImageFile}

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
    # crop: the above | letterbox: the whole image, its longer side fitted to crop_size, padded square
    resize: str = "crop"
    background: int | Sequence[int] = 255  # letterbox padding: a grey level or (r, g, b)
    upscale: bool = True    # letterbox: false leaves an image smaller than crop_size at its pixel size
    vflip: float = 0.0
    rot90: bool = False     # a uniformly drawn multiple of 90 degrees


def decode(sample: dict, num_classes: int, labelled: bool = True) -> tuple[Tensor, int]:
    """(uint8 [3, H, W], label) from a raw WebDataset sample; `BadSample` says what is wrong.

    `labelled=False` (prediction) accepts a sample without `.cls`; its label is then -1."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample(f"no image member (have {sorted(k for k in sample if not k.startswith('__'))})")
    label = -1 if not labelled and sample.get("cls") is None else parse_label(sample.get("cls"), num_classes)
    return decode_bytes(sample[key], f".{key}"), label


def decode_bytes(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> Tensor:
    """uint8 [3, H, W] RGB from encoded image bytes; `BadSample` names `what` when they do not decode.

    The container is identified by its signature and the header's size checked against `max_pixels`
    before decoding. An animated GIF gives its first frame and a 16-bit PNG is scaled to 8 bits: what
    `shards.build` stores for them, and what the models are trained on."""
    if not data:
        raise BadSample(f"empty {what} (0 bytes)")
    kind = image_kind(data)
    if kind is None:
        raise BadSample(f"undecodable {what}: not a JPEG, PNG, WebP or GIF (starts {data[:8]!r})")
    check_pixels(header_size(data, kind, what), what, max_pixels)
    if kind in ("png", "gif"):
        return _decode_pil(data, kind, what)
    try:
        # bytearray: frombuffer needs a writable buffer; the copy is a few KB
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise BadSample(f"undecodable {what}: {_reason(err)}") from err
    if image.ndim == 4:
        image = image[0]
    return v2.functional.to_dtype(image, torch.uint8, scale=True) if image.dtype != torch.uint8 else image


def check_pixels(size: tuple[int, int], what: str, max_pixels: int = MAX_PIXELS) -> None:
    """`BadSample` for an image whose header promises more pixels than `max_pixels` (a bomb)."""
    width, height = size
    if width * height > max_pixels:
        raise BadSample(f"{what} too large: {width}x{height} = {width * height:,} pixels > limit "
                        f"{max_pixels:,}")


def image_kind(data: bytes) -> str | None:
    """"jpg", "png", "webp" or "gif" from the file signature; None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def header_size(data: bytes, kind: str, what: str) -> tuple[int, int]:
    """(width, height) from the header alone: PIL's plugin for the format opens lazily (~30 us), so
    nothing is decoded or allocated for the pixels, and no decompression-bomb check of its own runs."""
    try:
        with _HEADER_READERS[kind](io.BytesIO(data)) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as err:
        raise BadSample(f"undecodable {what}: unreadable {kind} header: {_reason(err)}") from err


def _decode_pil(data: bytes, kind: str, what: str) -> Tensor:
    """PNG and GIF through PIL, whose errors are exceptions: torchvision 0.29's libpng error path
    (any IDAT damage: bad filter value, incorrect data check) ends the process with SIGSEGV."""
    opener = PngImagePlugin.PngImageFile if kind == "png" else GifImagePlugin.GifImageFile
    try:
        with opener(io.BytesIO(data)) as im:
            im.load()
            pixels = np.array(to_rgb(im))
    # DecompressionBombError: a GIF frame larger than the screen its header declares
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombError) as err:
        raise BadSample(f"undecodable {what}: {_reason(err)}") from err
    return torch.from_numpy(pixels).permute(2, 0, 1)  # HWC memory, as torchvision gives JPEGs


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


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
    """Random geometry, then the colour policy; every draw from torch's CPU generator, which
    `streams.seeded` seeds per sample (what bitwise resume and the torchvision-gpu backend rely on)."""
    steps: list[nn.Module] = [*_train_geometry(cfg)]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    # after hflip, so that vflip=0 and rot90=false draw nothing and keep the older runs' stream
    if cfg.vflip > 0:
        steps.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.rot90:
        steps.append(RandomRot90())
    if cfg.augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif cfg.augment == "colorjitter":
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    elif cfg.augment != "none":
        raise ValueError(f"data.augment must be one of {AUGMENTS}, got {cfg.augment!r}")
    return v2.Compose(steps)


def _train_geometry(cfg: AugmentConfig) -> list[nn.Module]:
    """crop: a random crop of the image's area (`scale`) and shape (`ratio`). letterbox: the whole image,
    then a random square crop of `scale` of the letterboxed area (a zoom in, shape kept) resized back to
    crop_size; scale=[1, 1] turns the zoom off."""
    if _resize_mode(cfg) == "crop":
        return [v2.RandomResizedCrop(cfg.crop_size, scale=cfg.scale, ratio=cfg.ratio, antialias=True)]
    steps: list[nn.Module] = [Letterbox(cfg.crop_size, cfg.background, cfg.upscale)]
    if tuple(cfg.scale) != (1.0, 1.0):
        steps.append(v2.RandomResizedCrop(cfg.crop_size, scale=cfg.scale, ratio=(1.0, 1.0), antialias=True))
    return steps


def eval_transform(cfg: AugmentConfig) -> Callable[[Tensor], Tensor]:
    if _resize_mode(cfg) == "letterbox":
        return Letterbox(cfg.crop_size, cfg.background, cfg.upscale)
    resize = round(cfg.crop_size / cfg.eval_crop_ratio)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(cfg.crop_size)])


def _resize_mode(cfg: AugmentConfig) -> str:
    if cfg.resize not in RESIZES:
        raise ValueError(f"data.resize must be one of {RESIZES}, got {cfg.resize!r}")
    return str(cfg.resize)


def rgb(background: int | Sequence[int]) -> tuple[int, int, int]:
    """A grey level or an [r, g, b] list as three uint8 channel values; `ValueError` names data.background."""
    values = (background,) * 3 if isinstance(background, int) else tuple(background)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                   for v in values):
        raise ValueError(f"data.background must be a grey level 0-255 or [r, g, b], got {background!r}")
    return values  # type: ignore[return-value]


def letterbox(image: Tensor, size: int, background: int | Sequence[int] = 255, upscale: bool = True
              ) -> Tensor:
    """uint8 [..., C, size, size]: the whole image centred on a square of `background`, its longer side
    resized to `size`. With `upscale` false a smaller image keeps its pixel size (the organism's size
    stays a cue); a larger one is still shrunk to fit. On the image's device (the torchvision-gpu path)."""
    height, width = image.shape[-2:]
    factor = size / max(height, width)
    if not upscale:
        factor = min(factor, 1.0)
    # the longer side lands on `size` exactly; a 1:100 sliver keeps at least one pixel across
    new_h, new_w = max(1, min(size, round(height * factor))), max(1, min(size, round(width * factor)))
    if (new_h, new_w) != (height, width):
        image = v2.functional.resize(image, [new_h, new_w], antialias=True)
    fill = torch.tensor(rgb(background), dtype=image.dtype, device=image.device).view(3, 1, 1)
    canvas = fill.expand(*image.shape[:-2], size, size).clone()
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[..., top:top + new_h, left:left + new_w] = image
    return canvas


class Letterbox(nn.Module):
    """`letterbox` as a transform step (no random draw)."""

    def __init__(self, size: int, background: int | Sequence[int] = 255, upscale: bool = True) -> None:
        super().__init__()
        self.size, self.background, self.upscale = size, rgb(background), upscale

    def forward(self, image: Tensor) -> Tensor:
        return letterbox(image, self.size, self.background, self.upscale)


class RandomRot90(nn.Module):
    """A rotation by k x 90 degrees, k uniform in {0, 1, 2, 3}: plankton has no up, and a right angle
    moves pixels without resampling them. One draw from torch's generator, as the flips make."""

    def forward(self, image: Tensor) -> Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1)).contiguous() if k else image


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
