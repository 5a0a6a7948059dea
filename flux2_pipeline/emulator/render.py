"""Deterministic Pillow pictures for the emulator: edited outputs and sample references.

`render_edit` turns reference image bytes and the job's parameters into one encoded
output image; `render_sample` draws the picture served at `/samples/{name}.png`.
Both are pure functions of their inputs, so identical jobs give identical bytes::

    >>> ref = render_sample("cat")
    >>> out = render_edit([ref], "make it night", seed=7, image_size="square", index=0)
    >>> out == render_edit([ref], "make it night", seed=7, image_size="square", index=0)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
import struct
import textwrap
import threading
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, UnidentifiedImageError

from flux2_pipeline.runcomfy.models import IMAGE_SIZE_PIXELS

SAMPLE_SIZE = 512
SAMPLE_NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")

CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}
"""MIME type of each `output_format`."""

# References are capped at 10 MiB of bytes but a tiny PNG can still claim gigapixels, so
# refuse those explicitly; camera photos (48-102 MP) are accepted, as the API accepts them.
# Pillow's own guard (Image.MAX_IMAGE_PIXELS, 89 MP) would warn on a 102 MP photo and refuse
# a 200 MP one, so references are opened past it and this cap decides.
_MAX_REFERENCE_PIXELS = 120_000_000
_BIG_DECODE_PIXELS = 16_000_000
_BIG_DECODES = threading.Lock()
"""One reference of more than `_BIG_DECODE_PIXELS` decoded at a time (up to 480 MB each)."""
_NO_LOCK = contextlib.nullcontext()
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"})
"""Modes `Image.reduce` takes (not "1", "P" or "I;16")."""

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


class ReferenceImageError(ValueError):
    """Bytes that are not a decodable image of a sane size."""


def check_reference(data: bytes) -> tuple[int, int]:
    """Return (width, height) of an encoded image, or raise `ReferenceImageError`.

    Example::

        >>> check_reference(render_sample("dog"))
        (512, 512)
    """
    try:
        with _open(data) as image:
            size = image.size
            if size[0] * size[1] > _MAX_REFERENCE_PIXELS:
                raise ReferenceImageError(f"image is too large ({size[0]}x{size[1]} pixels)")
            image.verify()
    except ReferenceImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ReferenceImageError(f"not a decodable image ({exc})") from None
    return size


def render_sample(name: str) -> bytes:
    """Draw the 512x512 PNG served at `/samples/{name}.png`: gradient, shapes, the name.

    Example::

        >>> render_sample("beach")[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if not SAMPLE_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"sample names are 1 to 64 of [a-z0-9_-], got {name[:80]!r}")
    rng = _rng("sample", name)
    size = SAMPLE_SIZE
    start, end = _color(rng), _color(rng)
    gradient = Image.linear_gradient("L").rotate(rng.choice((0, 90, 180, 270)), expand=False)
    image = ImageOps.colorize(gradient.resize((size, size)), start, end).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 6)):
        x0, y0 = rng.randint(0, size - 96), rng.randint(0, size - 176)
        x1, y1 = x0 + rng.randint(48, 200), y0 + rng.randint(48, 200)
        shape = rng.choice(("ellipse", "rectangle", "triangle"))
        fill, outline = _color(rng), _color(rng)
        if shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline, width=4)
        elif shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=4)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill, outline=outline)
    font = _font(44)
    draw.rectangle((0, size - 72, size, size), fill=(0, 0, 0))
    draw.text((size // 2, size - 36), name, fill=(255, 255, 255), font=font, anchor="mm")
    return _encode(image, "png")


def render_edit(
    references: Sequence[bytes],
    prompt: str,
    *,
    seed: int = 0,
    image_size: str = "square_hd",
    output_format: str = "png",
    index: int = 0,
    guidance_scale: float = 2.5,
    num_inference_steps: int = 28,
    enable_prompt_expansion: bool = False,
) -> bytes:
    """Render output image `index` of an emulated edit as encoded bytes.

    The first reference is cover-fitted to the preset's size and recoloured by a
    transform drawn from the seed, prompt, parameters and index; further references
    become inset thumbnails; the prompt is drawn as a caption.

    Example::

        >>> data = render_edit([render_sample("a")], "add a hat", image_size="square")
        >>> Image.open(io.BytesIO(data)).size
        (512, 512)
    """
    if not references:
        raise ValueError("an edit needs at least one reference image")
    if output_format not in CONTENT_TYPES:
        raise ValueError(f"output_format must be one of {sorted(CONTENT_TYPES)}")
    width, height = IMAGE_SIZE_PIXELS[image_size]
    digest = hashlib.sha256()
    for data in references:
        digest.update(hashlib.sha256(data).digest())
    rng = _rng(
        "edit",
        digest.hexdigest(),
        prompt,
        seed,
        image_size,
        index,
        guidance_scale,
        num_inference_steps,
        enable_prompt_expansion,
    )

    base = _decode_fit(references[0], (width, height))
    image = _recolor(base, rng, strength=min(1.0, 0.35 + guidance_scale / 20))
    draw = ImageDraw.Draw(image)
    _draw_insets(image, draw, references[1:], rng)
    _draw_marks(draw, (width, height), rng, count=1 + num_inference_steps // 10)
    _draw_caption(draw, (width, height), prompt, f"seed {seed}  #{index}")
    return _encode(image, output_format)


def _rng(*parts: object) -> random.Random:
    key = "\x1f".join(repr(part) for part in parts).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def _color(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


@lru_cache(maxsize=8)
def _font(size: int) -> Font:
    return ImageFont.load_default(size)


def _open(data: bytes) -> ImageFile.ImageFile:
    # `Image.open` without its process-wide pixel guard (see `_MAX_REFERENCE_PIXELS`).
    handle = io.BytesIO(data)
    Image.init()
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        verdict = accept(data[:16]) if accept is not None else True
        if isinstance(verdict, str) or not verdict:
            continue
        handle.seek(0)
        try:
            return factory(handle, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError("cannot identify image file")


def _decode_fit(data: bytes, size: tuple[int, int]) -> Image.Image:
    with _open(data) as source:
        # JPEG can decode at a reduced scale directly, which is much cheaper.
        source.draft("RGB", size)
        factor = min(source.width // size[0], source.height // size[1])
        if factor < 2 or source.mode not in _REDUCIBLE_MODES:
            rgb = ImageOps.exif_transpose(source).convert("RGB")
        else:
            with _BIG_DECODES if source.width * source.height > _BIG_DECODE_PIXELS else _NO_LOCK:
                # A camera photo: reduce it before any full-size copy is made.
                reduced = source.reduce(factor)
            reduced.info = dict(source.info)
            rgb = ImageOps.exif_transpose(reduced).convert("RGB")
    return ImageOps.fit(rgb, size, method=Image.Resampling.BILINEAR)


def _recolor(image: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    # A channel-mixing matrix near a random permutation reads as a clear "edit"
    # while keeping the reference recognisable.
    order = [0, 1, 2]
    rng.shuffle(order)
    matrix: list[float] = []
    for row in range(3):
        weights = [rng.uniform(0.0, 0.25) for _ in range(3)]
        weights[order[row]] += 0.75
        mixed = [
            (1 - strength) * (1.0 if col == row else 0.0) + strength * w
            for col, w in enumerate(weights)
        ]
        matrix.extend([*mixed, rng.uniform(-24, 24) * strength])
    recolored = image.convert("RGB", tuple(matrix))
    tint = Image.new("RGB", image.size, _color(rng))
    return Image.blend(recolored, tint, 0.12 + 0.1 * rng.random())


def _draw_insets(
    image: Image.Image, draw: ImageDraw.ImageDraw, extras: Sequence[bytes], rng: random.Random
) -> None:
    width, height = image.size
    side = max(64, min(width, height) // 4)
    margin = max(8, side // 12)
    for slot, data in enumerate(extras):
        thumb = _decode_fit(data, (side, side))
        x = width - (slot + 1) * (side + margin)
        y = margin
        draw.rectangle((x - 3, y - 3, x + side + 2, y + side + 2), fill=_color(rng))
        image.paste(thumb, (x, y))


def _draw_marks(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: random.Random, count: int
) -> None:
    width, height = size
    for _ in range(count):
        radius = rng.randint(min(size) // 40, min(size) // 12)
        x, y = rng.randint(0, width), rng.randint(0, height * 3 // 4)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=_color(rng), width=3)


def _draw_caption(draw: ImageDraw.ImageDraw, size: tuple[int, int], prompt: str, tag: str) -> None:
    width, height = size
    font_size = max(14, width // 36)
    font = _font(font_size)
    chars_per_line = max(16, int(width / (font_size * 0.55)))
    lines = textwrap.wrap(" ".join(prompt.split()), chars_per_line)[:3] or [""]
    lines.append(tag)
    line_height = int(font_size * 1.3)
    top = height - line_height * len(lines) - font_size
    draw.rectangle((0, top, width, height), fill=(16, 16, 16))
    for number, line in enumerate(lines):
        y = top + font_size // 2 + number * line_height
        draw.text((font_size, y), line, fill=(255, 255, 255), font=font)


def _encode(image: Image.Image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        # Level 1 is several times faster than the default and the emulator's
        # pictures are large flat areas, which compress well anyway.
        image.save(buffer, format="PNG", compress_level=1)
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="WEBP", quality=85, method=0)
    return buffer.getvalue()
