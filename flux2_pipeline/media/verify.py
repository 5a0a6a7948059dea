"""Verify image bytes with Pillow and describe them.

Example::

    info = inspect_image(png_bytes)
    info.width, info.height, info.format, info.ext, info.sha256   # 512, 512, "PNG", "png", "9f.."
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
"""File extension used in the store for each Pillow format (others: the format, lowercased)."""


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow can decode; the message says why."""


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


def inspect_image(data: bytes) -> ImageInfo:
    """Decode `data` fully and describe it; raises `UndecodableImage` if it is not an image.

    `verify()` checks the structure (PNG CRCs, chunk order) without decoding; it leaves the
    image unusable, so the bytes are opened again and decoded (`load()`), which catches a
    truncated JPEG that `verify()` lets through.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = image.size
                fmt = image.format
    except (UnidentifiedImageError, Image.DecompressionBombWarning) as exc:
        raise UndecodableImage(f"not a decodable image: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise UndecodableImage(f"refused to decode: {exc}") from exc
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
