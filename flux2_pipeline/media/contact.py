"""Contact sheets: reference thumbnails beside their edits, with the prompt, as one PNG.

Thumbnails decode as little as they can: a JPEG in draft mode (at 1/2 to 1/8 scale), then
`Image.thumbnail`'s `reduce`. Each decode holds its pixels from a `PixelBudget`, and an
image above the decode ceiling is not decoded at all: its cell says so.

Example::

    rows = contact_rows(iter_parquet(results_path), iter_manifest(manifest_path), store)
    sheet = render_contact_sheet(rows)
    save_png(sheet, Path("data/output/flux2_images/cats.contact.png"))
    markdown = markdown_preview(sheet)   # "![contact sheet](data:image/png;base64,...)"
"""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from upath import UPath

from flux2_pipeline.media.budget import PixelBudget
from flux2_pipeline.media.manifest import ImageRecord, Results, completed_rows
from flux2_pipeline.media.store import ImageStore
from flux2_pipeline.media.verify import DEFAULT_MAX_PIXELS, describe_pixels, open_image
from flux2_pipeline.paths import ensure_upath, write_bytes_atomically

MAX_ROWS = 24
THUMB = 160
TEXT_WIDTH = 280
PAD = 8
PREVIEW_MAX_BYTES = 300_000
PREVIEW_WIDTH = 900
_FONT_SIZE = 14
_WRAP = 34
_MAX_LINES = 8


@dataclass(frozen=True, slots=True)
class ContactRow:
    """One line of the sheet: a results row's prompt, its stored references and edits."""

    row_id: str
    prompt: str
    sources: tuple[UPath, ...]
    edits: tuple[UPath, ...]


def contact_rows(
    results: Results,
    records: Iterable[ImageRecord],
    store: ImageStore,
    limit: int = MAX_ROWS,
) -> list[ContactRow]:
    """The first `limit` completed rows that have at least one stored image, in row order.

    `records` are a manifest as the sync writes it (the completed rows' images, a row's
    images together, rows in results order) and are read only up to the `limit`-th row
    with a stored image; `results` only as far as that row.
    """
    by_row = _first_stored(records, store, limit)
    rows: list[ContactRow] = []
    for row in completed_rows(results, ["row_id", "prompt"]):
        found = by_row.get(row["row_id"])
        if not found:
            continue
        rows.append(
            ContactRow(
                row_id=row["row_id"],
                prompt=row["prompt"] or "",
                sources=tuple(path for _, path in sorted(found["source"])),
                edits=tuple(path for _, path in sorted(found["edited"])),
            )
        )
        if len(rows) >= limit:
            break
    return rows


def _first_stored(
    records: Iterable[ImageRecord], store: ImageStore, limit: int
) -> dict[str, dict[str, list[tuple[int, UPath]]]]:
    """Stored images of the first `limit` rows that have any, by row and role."""
    by_row: dict[str, dict[str, list[tuple[int, UPath]]]] = {}
    for record in records:
        if len(by_row) >= limit and record.row_id not in by_row:
            break  # a row's records are contiguous: the `limit`-th row is complete
        if record.ok and record.path is not None:
            roles = by_row.setdefault(record.row_id, {"source": [], "edited": []})
            roles[record.role].append((record.index, store.resolve(record.path)))
    return by_row


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


_REDUCING_GAP = 2.0
"""`Image.thumbnail`'s: draft and `reduce` down to twice the thumbnail, then resample."""
_NEEDS_CONVERSION = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
"""Modes `Image.thumbnail` cannot resize: converted first (a second full-size buffer)."""


def _cell(size: int, colour: tuple[int, int, int], lines: Sequence[str]) -> Image.Image:
    cell = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(cell).multiline_text((PAD, PAD), "\n".join(lines), fill="white")
    return cell


def _thumbnail(path: Path | UPath, size: int, max_pixels: int, budget: PixelBudget) -> Image.Image:
    try:
        with path.open("rb") as handle, open_image(handle) as image:
            width, height = image.size
            if width * height > max_pixels:
                shown = describe_pixels(width, height).replace(" (", "\n(")
                return _cell(size, (110, 110, 120), ["not decoded:", shown, "above the", "ceiling"])
            image.draft(None, (int(size * _REDUCING_GAP), int(size * _REDUCING_GAP)))
            decoded = image.size[0] * image.size[1]
            converted = image.mode in _NEEDS_CONVERSION
            with budget.hold(decoded * (2 if converted else 1)):
                source = image.convert("I") if converted else image
                source.thumbnail((size, size), reducing_gap=_REDUCING_GAP)
                return source.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return _cell(size, (200, 60, 60), ["unreadable"])


def render_contact_sheet(
    rows: Sequence[ContactRow],
    thumb: int = THUMB,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: PixelBudget | None = None,
) -> Image.Image:
    """A white grid: prompt text, then reference thumbnails, then edit thumbnails, per row.

    Images above `max_pixels` (the decode ceiling) get a cell saying so instead of a
    thumbnail; decodes hold their pixels from `budget` (default: one of `max_pixels`).
    """
    budget = budget if budget is not None else PixelBudget(max_pixels)
    font = _font(_FONT_SIZE)
    small = _font(_FONT_SIZE - 2)
    sources = max((len(row.sources) for row in rows), default=1) or 1
    edits = max((len(row.edits) for row in rows), default=1) or 1
    cell = thumb + PAD
    edits_x = PAD + TEXT_WIDTH + sources * cell + 2 * PAD
    width = edits_x + edits * cell
    header = _FONT_SIZE + 2 * PAD
    height = header + max(1, len(rows)) * (cell + PAD) + PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), "prompt", fill=(90, 90, 90), font=small)
    draw.text((PAD + TEXT_WIDTH, PAD), "references", fill=(90, 90, 90), font=small)
    draw.text((edits_x, PAD), "edits", fill=(90, 90, 90), font=small)
    if not rows:
        draw.text((PAD, header), "no stored images", fill="black", font=font)
    for number, row in enumerate(rows):
        top = header + number * (cell + PAD)
        draw.line([(0, top - PAD // 2), (width, top - PAD // 2)], fill=(220, 220, 220))
        draw.text((PAD, top), row.row_id, fill=(40, 40, 160), font=font)
        lines = textwrap.wrap(row.prompt, _WRAP)[:_MAX_LINES] or ["(empty prompt)"]
        draw.multiline_text((PAD, top + _FONT_SIZE + 6), "\n".join(lines), fill="black", font=small)
        for column, path in enumerate(row.sources):
            sheet.paste(
                _thumbnail(path, thumb, max_pixels, budget),
                (PAD + TEXT_WIDTH + column * cell, top),
            )
        arrow_x = edits_x - 2 * PAD
        draw.text((arrow_x, top + thumb // 2), ">", fill=(120, 120, 120), font=font)
        for column, path in enumerate(row.edits):
            sheet.paste(_thumbnail(path, thumb, max_pixels, budget), (edits_x + column * cell, top))
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as an optimized PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path | UPath) -> None:
    """Write the image as PNG atomically (temporary file, then rename; one upload remotely)."""
    write_bytes_atomically(ensure_upath(path), png_bytes(image))


def markdown_preview(
    image: Image.Image, max_bytes: int = PREVIEW_MAX_BYTES, width: int = PREVIEW_WIDTH
) -> str:
    """Markdown embedding a downscaled copy of `image` whose base64 stays under `max_bytes`."""
    scale = min(1.0, width / image.width)
    while True:
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        small = image.resize(size, Image.Resampling.LANCZOS) if scale < 1 else image
        encoded = base64.b64encode(png_bytes(small)).decode("ascii")
        if len(encoded) <= max_bytes or size[0] <= 64:
            return f"![contact sheet](data:image/png;base64,{encoded})"
        scale *= 0.7
