"""Verify image bytes with Pillow and describe them.

Before anything is decoded, the width and height are read from the header (Pillow's
`Image.open` is lazy) and checked against a pixel cap, so a small file that claims
9400x9400 pixels is refused without allocating gigabytes.

Example::

    info = inspect_image(png_bytes, max_pixels=40_000_000)
    info.width, info.height, info.format, info.ext, info.sha256   # 512, 512, "PNG", "png", "9f.."
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
"""The largest image decoded, in pixels (width x height): 40 MP, about 160 MB as RGBA."""

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
"""File extension used in the store for each Pillow format (others: the format, lowercased)."""


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow can decode; the message says why."""


class TooManyPixels(UndecodableImage):
    """The header declares more pixels than the cap; the image was not decoded."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What verification learned about one image's bytes."""

    sha256: str
    width: int
    height: int
    format: str
    bytes: int

    @property
    def ext(self) -> str:
        """The store's file extension for this format."""
        return EXTENSIONS.get(self.format, self.format.lower())


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise TooManyPixels(
            f"{width}x{height} is {width * height / 1e6:.1f} MP, more than the "
            f"{max_pixels / 1e6:g} MP cap (not decoded)"
        )


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode `data` fully and describe it; raises `UndecodableImage` if it is not an image.

    Raises `TooManyPixels` (an `UndecodableImage`) when the header declares more than
    `max_pixels`, before any pixel is decoded. `verify()` checks the structure (PNG CRCs,
    chunk order) without decoding; it leaves the image unusable, so the bytes are opened
    again and decoded (`load()`), which catches a truncated JPEG that `verify()` lets
    through.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                _check_pixels(probe, max_pixels)
                probe.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = image.size
                fmt = image.format
    except TooManyPixels:
        raise
    except UnidentifiedImageError as exc:
        raise UndecodableImage(f"not a decodable image: {exc}") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise TooManyPixels(f"refused to decode: {exc}") from exc
    except Exception as exc:  # Pillow's decoders raise many types on hostile bytes
        raise UndecodableImage(f"corrupt image data: {type(exc).__name__}: {exc}") from exc
    if not fmt:
        raise UndecodableImage("Pillow decoded the bytes but could not name their format")
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        width=int(width),
        height=int(height),
        format=fmt,
        bytes=len(data),
    )
