"""Images built in memory for the media tests: a valid PNG, and a decompression bomb.

Example:
    >>> inspect_image(png()).width
    32
    >>> len(pixel_bomb(20_000, 20_000)) < 1_000_000  # gigabytes once decoded
    True
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png(size: tuple[int, int] = (32, 24), color: str = "red") -> bytes:
    """A small valid PNG of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_bomb(width: int, height: int) -> bytes:
    """A valid RGB PNG of width x height zero pixels: a few hundred KB, gigabytes decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
