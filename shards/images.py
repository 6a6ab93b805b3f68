"""Check one encoded image and decide the bytes to store: unchanged, or re-encoded.

Every image is fully decoded once here, so a truncated or corrupt file is caught at build
time instead of in the middle of an epoch on 64 GPUs.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shards.config import IMAGE_EXTENSIONS

# PIL's names for the formats stored as they are; any other format is re-encoded as PNG
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_EXT_ALIASES = {"jpeg": "jpg", "jpe": "jpg", "jfif": "jpg", "tif": "tiff"}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# a truncated file must fail, never decode as grey padding
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(ValueError):
    """The input cannot become a sample; the message is the quarantine reason."""


@dataclass(frozen=True)
class Encoded:
    ext: str                 # one of IMAGE_EXTENSIONS
    data: bytes
    note: str | None = None   # set when the stored form differs from the input file


def declared_ext(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
    return _EXT_ALIASES.get(ext, ext)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; 16-bit greyscale is scaled, not clipped at 255."""
    if im.mode in _SIXTEEN_BIT:
        wide = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "I" or wide.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(wide * 255.0 / top), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def _draft(im: Image.Image, max_side: int | None) -> None:
    """Let libjpeg decode at a reduced scale where the full pixels are not needed.

    A scaled decode still reads the whole entropy-coded stream, so truncation is caught all
    the same (measured: 600/600 cuts, as with a full decode) at about twice the speed.
    """
    if im.format != "JPEG":
        return
    if max_side is not None and max(im.size) > max_side:
        im.draft(im.mode, (max_side, max_side))   # never smaller than the resize target
    else:
        im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))


def _reencode(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        to_rgb(im).save(buf, "JPEG", quality=quality, optimize=False)
    else:
        keep = im.mode in ("1", "L", "LA", "RGB", "RGBA", "P", "I;16")
        (im if keep else to_rgb(im)).save(buf, "PNG")
    return buf.getvalue()


def prepare(data: bytes, name: str, max_side: int | None, quality: int,
            max_pixels: int) -> Encoded:
    """Return what to store for one input file, or raise BadImage with the reason."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    # PIL's own bomb limit is process-global: follow max_pixels here, restore it for the caller
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise BadImage(f"decompression bomb: {width}x{height} pixels > "
                                   f"max_pixels={max_pixels}")
                _draft(im, max_side)
                im.load()
                return _choose(im, (width, height), data, name, max_side, quality)
    except UnidentifiedImageError:
        raise BadImage("not an image: content not recognised by PIL") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, BadImage):
            raise
        raise BadImage(f"corrupt or truncated image: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _choose(im: Image.Image, size: tuple[int, int], data: bytes, name: str, max_side: int | None,
            quality: int) -> Encoded:
    """`size` is the stored image's size; `im` may have been decoded at a reduced scale."""
    fmt = im.format or "?"
    real_ext = _FORMAT_EXT.get(fmt)
    declared = declared_ext(name)
    if max_side is not None and max(size) > max_side:
        # EXIF orientation is lost on re-encoding: apply it to the pixels first
        small = ImageOps.exif_transpose(im)
        small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return Encoded("jpg", _reencode(small, "JPEG", quality),
                       f"resized from {size[0]}x{size[1]} and re-encoded as JPEG")
    if real_ext is None:
        return Encoded("png", _reencode(ImageOps.exif_transpose(im), "PNG", quality),
                       f"{fmt} re-encoded as PNG")
    if declared != real_ext:
        return Encoded(real_ext, data, f"extension .{declared or '(none)'} but content is {fmt}: "
                                       f"stored as .{real_ext}")
    assert real_ext in IMAGE_EXTENSIONS
    return Encoded(real_ext, data)
