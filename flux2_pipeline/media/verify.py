"""Verify image bytes with Pillow and describe them, in memory bounded by a pixel budget.

Width, height and format come from the header (Pillow's `Image.open` is lazy). The
structure is then checked without decoding every pixel where the format allows it:

- PNG (`png-stream`): every chunk's CRC, and the whole pixel stream inflated in pieces of
  `INFLATE_PIECE` bytes and counted against the size the header declares, with a valid
  filter byte at the start of every row. A stream that inflates beyond that size (a
  bomb's usual shape), ends early or is not zlib fails; no pixel buffer is allocated.
- JPEG and MPO (`jpeg-draft`): decoded in draft mode at 1/8 scale, which still reads
  every scan, so a truncated file fails.
- Other formats (`pixels`): decoded fully.

Every decode holds its pixels from a `PixelBudget`. An image whose header declares more
than `max_pixels` pixels (the decode ceiling) is never decoded: it is described from its
header (`header`, a PNG's chunk CRCs checked too) with a `note` saying why. Only bytes
whose header cannot be read, or whose structure is broken, raise `UndecodableImage`.
Pillow's process-wide guard (`Image.MAX_IMAGE_PIXELS`) is not what decides: the ceiling
and the budget here are.

Example::

    info = inspect_image(png_bytes, max_pixels=120_000_000)
    info.width, info.height, info.ext   # 8000, 6000, "png": from the header
    info.verified                       # "png-stream": checked without a pixel buffer
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from flux2_pipeline.media.budget import PixelBudget

DEFAULT_MAX_PIXELS = 120_000_000
"""The decode ceiling, in pixels (width x height): 120 MP covers 100-102 MP
medium-format cameras; up to 480 MB decoded (Pillow keeps 4 bytes per RGB pixel)."""

INFLATE_PIECE = 1 << 20
"""Most bytes of a PNG's pixel stream inflated at a time."""

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
"""File extension used in the store for each Pillow format (others: the format, lowercased)."""

JPEG_FORMATS = frozenset({"JPEG", "MPO"})
"""Formats Pillow can decode at a reduced scale (`Image.draft`)."""

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each PNG colour type."""
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
"""The seven passes of an interlaced PNG: first column, first row, column step, row step."""
_MAX_FILTER = 4


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow can read; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What verification learned about one image's bytes.

    `verified` says how far the bytes were checked (`pixels`, `png-stream`, `jpeg-draft`
    or `header`); `note` says why an image was not decoded (and has no thumbnail).
    """

    sha256: str
    width: int
    height: int
    format: str
    bytes: int
    verified: str = "pixels"
    note: str | None = None

    @property
    def ext(self) -> str:
        """The store's file extension for this format."""
        return EXTENSIONS.get(self.format, self.format.lower())


def open_image(source: bytes | IO[bytes]) -> ImageFile.ImageFile:
    """`Image.open` (lazy: only the header is read) without Pillow's pixel guard.

    Pillow refuses to even open an image of more than twice `Image.MAX_IMAGE_PIXELS`
    (179 MP) and warns above it; here the decode ceiling and the pixel budget bound memory,
    and a 200 MP photo's header must still be readable. Raises `UnidentifiedImageError`.

    Example::

        with open_image(path.open("rb")) as image:
            image.size   # (12000, 8500), nothing decoded
    """
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    start = handle.tell()
    prefix = handle.read(16)
    Image.init()
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        verdict = accept(prefix) if accept is not None else True
        if isinstance(verdict, str) or not verdict:
            continue
        handle.seek(start)
        try:
            return factory(handle, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # as Image.open: not this format after all
    raise UnidentifiedImageError("cannot identify image file")


def describe_pixels(width: int, height: int) -> str:
    """`8000x6000 (48.0 MP)`."""
    return f"{width}x{height} ({width * height / 1e6:.1f} MP)"


def not_decoded_note(width: int, height: int, max_pixels: int) -> str:
    """Why an image above the ceiling has no thumbnail."""
    return (
        f"not decoded: {describe_pixels(width, height)} is above the "
        f"{max_pixels / 1e6:g} MP decode ceiling; stored and described from its header, "
        "no thumbnail"
    )


def inspect_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, budget: PixelBudget | None = None
) -> ImageInfo:
    """Describe `data` and check its structure; raises `UndecodableImage` if it is broken.

    Decodes hold their pixels from `budget` (default: a budget of `max_pixels` for this
    call alone). Above `max_pixels`, nothing is decoded and the result says so.
    """
    budget = budget if budget is not None else PixelBudget(max_pixels)
    try:
        with open_image(data) as image:
            width, height = (int(side) for side in image.size)
            fmt = image.format
            if not fmt:
                raise UndecodableImage("Pillow read the header but could not name the format")
            if width < 1 or height < 1:
                raise UndecodableImage(f"the header declares {width}x{height} pixels")
            verified, note = _check(data, image, max_pixels, budget)
    except UndecodableImage:
        raise
    except UnidentifiedImageError as exc:
        raise UndecodableImage(f"not a readable image (no header Pillow knows): {exc}") from exc
    except Exception as exc:  # Pillow's decoders raise many types on hostile bytes
        raise UndecodableImage(f"corrupt image data: {type(exc).__name__}: {exc}") from exc
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=fmt,
        bytes=len(data),
        verified=verified,
        note=note,
    )


def _check(
    data: bytes, image: ImageFile.ImageFile, max_pixels: int, budget: PixelBudget
) -> tuple[str, str | None]:
    width, height = image.size
    if width * height > max_pixels:
        if image.format == "PNG":
            image.verify()  # the chunk CRCs from the pixel data on: no inflating
        return "header", not_decoded_note(width, height, max_pixels)
    if image.format == "PNG":
        check_png_stream(data, image)
        return "png-stream", None
    if image.format in JPEG_FORMATS:
        image.draft(None, (max(1, width // 8), max(1, height // 8)))
        with budget.hold(image.size[0] * image.size[1]):
            image.load()
        return "jpeg-draft", None
    with budget.hold(width * height):
        image.load()
    return "pixels", None


def check_png_stream(data: bytes, image: ImageFile.ImageFile) -> None:
    """Check a PNG's chunks from its pixel data to IEND and inflate that data in pieces.

    `image` is `data` opened (header read, nothing decoded). Raises `UndecodableImage`
    naming the fault. Memory stays within a few `INFLATE_PIECE`s whatever the image size.
    """
    rows = _PngRows(_png_row_segments(data))
    inflater = zlib.decompressobj()
    view = memoryview(data)
    stream = PngImagePlugin.ChunkStream(io.BytesIO(data))
    assert stream.fp is not None
    stream.fp.seek(image.tile[0][2] - 8)
    while True:
        try:
            cid, pos, length = stream.read()
        except struct.error:
            raise UndecodableImage("truncated PNG: the file ends inside a chunk header") from None
        if cid == b"IEND":
            break
        if pos + length + 4 > len(data):
            raise UndecodableImage(f"truncated PNG: the {cid!r} chunk runs past the file's end")
        body = view[pos : pos + length]
        stream.fp.seek(pos + length)
        stream.crc(cid, body)  # type: ignore[arg-type]  # zlib reads any buffer
        if cid == b"IDAT" and not inflater.eof:
            for piece in _inflate(inflater, body):
                rows.feed(piece)
    if not inflater.eof or not rows.complete:
        raise UndecodableImage(
            f"truncated PNG: the pixel data ends after {rows.seen} of the "
            f"{rows.expected} bytes its header declares"
        )


def _inflate(inflater: zlib._Decompress, data: memoryview) -> Iterator[bytes]:
    try:
        out = inflater.decompress(data, INFLATE_PIECE)
        while True:
            if out:
                yield out
            tail = inflater.unconsumed_tail
            if inflater.eof or (not tail and len(out) < INFLATE_PIECE):
                return
            out = inflater.decompress(tail, INFLATE_PIECE)
    except zlib.error as exc:
        raise UndecodableImage(f"corrupt PNG pixel data: {exc}") from None


def _png_row_segments(data: bytes) -> list[tuple[int, int]]:
    """(bytes per row with its filter byte, rows) of each pass, from the IHDR chunk."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = depth * _PNG_CHANNELS.get(colour, 0)
    if not bits:
        raise UndecodableImage(f"PNG colour type {colour} is not one the format defines")
    passes = (
        [(width, height)]
        if not interlace
        else [
            ((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7
        ]
    )
    return [(1 + (w * bits + 7) // 8, h) for w, h in passes if w > 0 and h > 0]


class _PngRows:
    """Counts inflated pixel data against the declared rows, checking each filter byte."""

    def __init__(self, segments: list[tuple[int, int]]) -> None:
        self._segments = segments
        self._segment = 0
        self._into = 0  # bytes seen of the current segment
        self.seen = 0
        self.expected = sum(row * count for row, count in segments)

    @property
    def complete(self) -> bool:
        return self.seen == self.expected

    def feed(self, piece: bytes) -> None:
        at = 0
        while at < len(piece):
            if self._segment >= len(self._segments):
                raise UndecodableImage(
                    f"corrupt PNG: the pixel data inflates beyond the {self.expected} bytes "
                    "its header declares"
                )
            row, count = self._segments[self._segment]
            part = piece[at : at + row * count - self._into]
            filters = part[(-self._into) % row :: row]
            if filters and max(filters) > _MAX_FILTER:
                raise UndecodableImage(f"corrupt PNG: row filter type {max(filters)} is unknown")
            at += len(part)
            self._into += len(part)
            self.seen += len(part)
            if self._into == row * count:
                self._segment, self._into = self._segment + 1, 0
