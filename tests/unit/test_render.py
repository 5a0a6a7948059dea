"""The emulator's renderer: deterministic, real images, at the preset sizes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from flux2_pipeline.emulator import check_reference, render_edit, render_sample
from flux2_pipeline.emulator.render import ReferenceImageError
from flux2_pipeline.runcomfy.models import IMAGE_SIZE_PIXELS


@pytest.fixture(scope="module")
def refs() -> list[bytes]:
    return [render_sample("cat"), render_sample("dog")]


def test_sample_is_deterministic_png() -> None:
    data = render_sample("cat")
    assert data == render_sample("cat") != render_sample("dog")
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (512, 512)


@pytest.mark.parametrize("name", ["", "Cat", "a/b", "x" * 65])
def test_sample_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        render_sample(name)


@pytest.mark.parametrize("image_size", sorted(IMAGE_SIZE_PIXELS))
def test_edit_has_the_preset_size(refs: list[bytes], image_size: str) -> None:
    data = render_edit(refs, "add a hat", image_size=image_size, output_format="jpeg")
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == IMAGE_SIZE_PIXELS[image_size]


def test_edit_is_deterministic_and_input_sensitive(refs: list[bytes]) -> None:
    base = render_edit(refs, "add a hat", seed=1, image_size="square", index=0)
    assert base == render_edit(refs, "add a hat", seed=1, image_size="square", index=0)
    variants = [
        render_edit(refs, "add a hat", seed=2, image_size="square", index=0),
        render_edit(refs, "add a cap", seed=1, image_size="square", index=0),
        render_edit(refs, "add a hat", seed=1, image_size="square", index=1),
        render_edit(refs[::-1], "add a hat", seed=1, image_size="square", index=0),
        render_edit(refs, "add a hat", seed=1, image_size="square", guidance_scale=9.0),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_check_reference() -> None:
    assert check_reference(render_sample("a")) == (512, 512)
    with pytest.raises(ReferenceImageError):
        check_reference(b"<html>not an image</html>")
    with pytest.raises(ValueError):
        render_edit([], "p")


@pytest.mark.parametrize("mode", ["RGB", "P", "1", "I;16"])
def test_a_reference_four_times_the_output_renders_in_any_mode(mode: str) -> None:
    # Camera-sized references are reduced before any full-size copy; modes `reduce`
    # does not take go the plain way.
    buffer = io.BytesIO()
    Image.new(mode, (2048, 2048)).save(buffer, format="PNG")
    out = render_edit([buffer.getvalue()], "brighter", image_size="square")
    assert Image.open(io.BytesIO(out)).size == (512, 512)
