"""The decode budget counts pixels, serves waiters in order, and contact sheets live by it."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from flux2_pipeline.media import ContactRow, PixelBudget, render_contact_sheet
from flux2_pipeline.media.contact import PAD, TEXT_WIDTH, THUMB
from tests.helpers.images import pixel_bomb

WAIT = 5.0


class RecordingBudget(PixelBudget):
    """A real budget that remembers every hold and the most pixels held at once."""

    def __init__(self, pixels: int) -> None:
        super().__init__(pixels)
        self.holds: list[int] = []
        self.peak = 0

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with super().hold(pixels):
            self.holds.append(pixels)
            self.peak = max(self.peak, self.in_use)
            yield


def start_hold(budget: PixelBudget, pixels: int, release: threading.Event) -> threading.Event:
    """Hold `pixels` in a thread until `release` is set; the returned event says it holds."""
    holding = threading.Event()

    def run() -> None:
        with budget.hold(pixels):
            holding.set()
            release.wait(WAIT)

    threading.Thread(target=run, daemon=True).start()
    return holding


def test_decodes_share_the_budget_by_pixels_not_by_count() -> None:
    budget = PixelBudget(100)
    release_first, release_rest = threading.Event(), threading.Event()
    first = start_hold(budget, 60, release_first)
    assert first.wait(WAIT)
    small = start_hold(budget, 40, release_rest)  # fits beside the first
    assert small.wait(WAIT) and budget.in_use == 100
    third = start_hold(budget, 30, release_rest)  # does not fit: waits
    assert not third.wait(0.3)
    release_first.set()
    assert third.wait(WAIT) and budget.in_use == 70
    release_rest.set()


def test_an_image_larger_than_the_budget_waits_until_alone_and_goes_first() -> None:
    budget = PixelBudget(100)
    release_small, release_big, release_late = (threading.Event() for _ in range(3))
    small = start_hold(budget, 10, release_small)
    assert small.wait(WAIT)
    big = start_hold(budget, 250, release_big)
    assert not big.wait(0.3)  # 10 pixels are held: the big one waits to be alone
    late = start_hold(budget, 10, release_late)
    assert not late.wait(0.3)  # it would fit, but the big one came first
    release_small.set()
    assert big.wait(WAIT) and budget.in_use == 100
    assert not late.wait(0.3)
    release_big.set()
    assert late.wait(WAIT)
    release_late.set()


def test_a_budget_must_hold_something() -> None:
    with pytest.raises(ValueError, match="at least 1 pixel"):
        PixelBudget(0)


def save(path: Path, image: Image.Image, fmt: str) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return path


def test_contact_sheet_thumbnails_decode_little_and_skip_images_above_the_ceiling(
    tmp_path: Path,
) -> None:
    photo = save(tmp_path / "photo.jpg", Image.new("RGB", (4000, 3000), (0, 90, 200)), "JPEG")
    drawing = save(tmp_path / "drawing.png", Image.new("RGB", (800, 600), (250, 200, 0)), "PNG")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(pixel_bomb(9400, 9400))
    budget = RecordingBudget(50_000_000)
    rows = [ContactRow("r0", "a prompt", (photo, bomb), (drawing,))]
    sheet = render_contact_sheet(rows, max_pixels=50_000_000, budget=budget)
    # The JPEG decodes at 1/8 scale (500x375), the PNG fully; the bomb not at all.
    assert budget.holds == [500 * 375, 800 * 600]
    assert budget.peak == 800 * 600 and budget.in_use == 0
    top = 14 + 2 * PAD  # below the header line
    photo_cell = sheet.getpixel((PAD + TEXT_WIDTH + THUMB // 2, top + THUMB // 3))
    bomb_cell = sheet.getpixel((PAD + TEXT_WIDTH + THUMB + PAD + THUMB - 4, top + THUMB - 4))
    assert photo_cell == pytest.approx((0, 90, 200), abs=3)
    assert bomb_cell == (110, 110, 120)  # the "not decoded" cell, not a thumbnail


def test_the_decode_ceiling_is_a_setting() -> None:
    from flux2_pipeline.media import DEFAULT_MAX_PIXELS
    from flux2_pipeline.settings import Settings, SettingsError

    assert DEFAULT_MAX_PIXELS >= 100_000_000  # 100-102 MP camera photos are decoded
    assert Settings.from_env({}).storage.max_decode_pixels == DEFAULT_MAX_PIXELS
    chosen = Settings.from_env({"FLUX2_MAX_DECODE_PIXELS": "50000000"})
    assert chosen.storage.max_decode_pixels == 50_000_000
    for bad in ("0", "lots"):
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({"FLUX2_MAX_DECODE_PIXELS": bad})
        assert str(caught.value).startswith("FLUX2_MAX_DECODE_PIXELS") and "\n" not in str(
            caught.value
        )
