"""Hostile URLs and hostile images fail one manifest row each, never the step.

Every host name resolves through a stub; forbidden addresses are refused before any
request is made (the MockTransport handler would fail the test if it were reached).
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from PIL import Image

from flux2_pipeline.media import (
    AddressPolicy,
    FetchLimits,
    ImageRecord,
    ImageRef,
    ImageStore,
    SyncReport,
    UndecodableImage,
    inspect_image,
    read_manifest,
    sync_images,
)
from flux2_pipeline.media import verify as verify_module
from tests.helpers.images import pixel_bomb

HOSTS = {
    "img.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "lan.test": ["192.168.0.10"],
}
SIGNED = "https://img.test/gone.png?X-Amz-Credential=AKIASECRETKEY&X-Amz-Signature=feedSECRET"


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


async def stub_resolver(host: str, port: int) -> Sequence[str]:
    if host not in HOSTS:
        raise OSError(f"unknown test host {host}")
    return HOSTS[host]


def refs(*urls: object) -> list[ImageRef]:
    return [ImageRef(f"r{i}", None, "source", 0, url) for i, url in enumerate(urls)]  # type: ignore[arg-type]


async def sync(
    store: ImageStore,
    wanted: list[ImageRef],
    handler: httpx.MockTransport,
    policy: AddressPolicy,
    **options: int,
) -> tuple[SyncReport, list[ImageRecord]]:
    """Sync into a manifest beside the store, reused by the next sync; its records."""
    manifest = store.base / "manifest.parquet"
    report = await sync_images(
        wanted,
        store,
        manifest,
        manifest,
        policy=policy,
        resolver=stub_resolver,
        transport=handler,
        limits=FetchLimits(attempts=1, backoff_base=0.0),
        **options,
    )
    return report, read_manifest(manifest)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", base=tmp_path)


def refuse_everything(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request may be made: {request.url}")


async def test_ssrf_targets_are_refused_before_any_request(store: ImageStore) -> None:
    wanted = refs(
        "http://metadata.test/latest/meta-data/iam",
        "http://169.254.169.254/latest/meta-data/",
        "http://lan.test/a.png",
        "http://img.test/a.png",  # loopback: refused because the API is remote
        "http://[::ffff:127.0.0.1]/a.png",
    )
    policy = AddressPolicy.for_api("https://api.runcomfy.net")
    _, records = await sync(store, wanted, httpx.MockTransport(refuse_everything), policy)
    errors = [record.error or "" for record in records]
    assert [error.split(":")[0] for error in errors] == ["refused"] * 5
    assert "link-local address 169.254.169.254 for http://metadata.test/" in errors[0]
    assert "private address 192.168.0.10" in errors[2]
    assert "loopback address 127.0.0.1" in errors[3]


async def test_a_redirect_to_the_metadata_service_is_refused(store: ImageStore) -> None:
    def redirect(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "127.0.0.1", "only the approved address is contacted"
        return httpx.Response(302, headers={"location": "http://metadata.test/creds"})

    policy = AddressPolicy.for_api("http://127.0.0.1:8188")
    _, (record,) = await sync(
        store, refs("http://img.test/a.png"), httpx.MockTransport(redirect), policy
    )
    assert record.error == (
        "refused: link-local address 169.254.169.254 for http://metadata.test/creds "
        "(redirected from http://img.test/a.png)"
    )


async def test_malformed_urls_are_failed_rows_and_the_manifest_is_written(
    store: ImageStore, tmp_path: Path
) -> None:
    def good(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=png(), headers={"content-type": "image/png"})

    wanted = refs(
        "http://☃.test/x.png",
        "http://[::1/a.png",
        "http://img.test/a\x00.png",
        "http://img.test:99999/a.png",
        "gopher://img.test/a.png",
        None,
        "http://img.test/ok.png",
    )
    report, records = await sync(
        store, wanted, httpx.MockTransport(good), AddressPolicy(allow_loopback=True)
    )
    kinds = [(record.error or "ok").split(":")[0] for record in records]
    assert kinds == ["invalid_url"] * 6 + ["ok"]
    assert [r.status for r in records] == ["failed"] * 6 + ["ok"]
    assert (report.failed, report.stored) == (6, 1)
    assert [r.row_id for r in report.first_failures] == ["r0", "r1", "r2", "r3", "r4"]
    assert all("\n" not in (r.error or "") for r in records)


async def test_signed_urls_are_redacted_in_errors_and_in_the_manifest(
    store: ImageStore, tmp_path: Path
) -> None:
    ok_signed = SIGNED.replace("gone.png", "ok.png")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ok.png":
            return httpx.Response(200, content=png(), headers={"content-type": "image/png"})
        return httpx.Response(403)

    report, records = await sync(
        store,
        refs(SIGNED, ok_signed),
        httpx.MockTransport(handler),
        AddressPolicy(allow_loopback=True),
    )
    assert b"SECRET" not in (tmp_path / "manifest.parquet").read_bytes()
    failed, stored = records
    assert "SECRET" not in repr(records) and "SECRET" not in repr(report)
    assert failed.error is not None and failed.error.startswith(
        "unavailable: HTTP 403 Forbidden from https://img.test/gone.png?X-Amz-Credential=REDACTED"
    )
    assert stored.ok and stored.url.endswith("X-Amz-Signature=REDACTED")
    # The redacted URL is the reuse key: the next sync does not fetch the image again.
    again, records = await sync(
        store,
        refs(SIGNED, ok_signed),
        httpx.MockTransport(handler),
        AddressPolicy(allow_loopback=True),
    )
    assert records[1].ok and (again.reused, again.downloaded) == (1, 0)


async def test_an_image_above_the_decode_ceiling_is_stored_from_its_header(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = pixel_bomb(9400, 9400)
    assert len(bomb) < 400_000

    def handler(request: httpx.Request) -> httpx.Response:
        body = bomb if request.url.path == "/bomb.png" else png((300, 200))
        return httpx.Response(200, content=body, headers={"content-type": "image/png"})

    # Above the ceiling nothing decodes or inflates: any attempt fails the test.
    def no_inflating(*args: object) -> None:
        raise AssertionError("an image above the ceiling was inflated")

    monkeypatch.setattr(verify_module, "check_png_stream", no_inflating)
    report, (bomb_row, wide_row) = await sync(
        store,
        refs("http://img.test/bomb.png", "http://img.test/wide.png"),
        httpx.MockTransport(handler),
        AddressPolicy(allow_loopback=True),
        max_pixels=50_000,
        max_decodes=1,
    )
    assert (bomb_row.status, bomb_row.width, bomb_row.height) == ("ok", 9400, 9400)
    assert (bomb_row.verified, bomb_row.error) == ("header", None)
    assert bomb_row.note == (
        "not decoded: 9400x9400 (88.4 MP) is above the 0.05 MP decode ceiling; "
        "stored and described from its header, no thumbnail"
    )
    assert (wide_row.width, wide_row.height, wide_row.verified) == (300, 200, "header")
    assert store.read(bomb_row.path or "") == bomb
    assert (report.stored, report.not_decoded, report.failed) == (2, 2, 0)


def test_the_default_path_verifies_a_bomb_without_taking_its_memory(tmp_path: Path) -> None:
    bomb_path = tmp_path / "bomb.png"
    bomb_path.write_bytes(pixel_bomb(9400, 9400))
    info = inspect_image(bomb_path.read_bytes())
    assert (info.width, info.height, info.verified, info.note) == (9400, 9400, "png-stream", None)
    # In a fresh process, checking the bomb's whole pixel stream costs almost nothing;
    # decoding it would take 9400 * 9400 * 4 = 353 MB (Pillow keeps RGB in 4 bytes).
    script = (
        "import resource, sys\n"
        "from flux2_pipeline.media import inspect_image\n"
        f"data = open({str(bomb_path)!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert inspect_image(data).verified == 'png-stream'\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    grown_kib = int(result.stdout.strip())
    assert grown_kib < 20 * 1024, f"checking the bomb grew the process by {grown_kib} KiB"


def test_pillows_own_pixel_guard_does_not_decide(recwarn: pytest.WarningsRecorder) -> None:
    # 102 MP: Pillow warns (more than 89 MP); 210 MP: Pillow refuses to open (179 MP).
    photo = inspect_image(pixel_bomb(12000, 8500))
    huge = inspect_image(pixel_bomb(15000, 14000))
    assert (photo.width, photo.height, photo.verified) == (12000, 8500, "png-stream")
    assert (huge.width, huge.height, huge.verified) == (15000, 14000, "header")
    assert huge.note is not None and "(210.0 MP) is above the 120 MP decode ceiling" in huge.note
    assert not recwarn.list


def png_with_stream(width: int, height: int, raw: bytes, *, colour: int = 2) -> bytes:
    """A PNG whose header declares width x height and whose IDAT holds `raw`, deflated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    idat = zlib.compress(raw, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # A 64x64 header over 100 MB of pixel data: stopped as soon as it passes 12,352 bytes.
        (b"\0" * 100_000_000, "inflates beyond the 12352 bytes its header declares"),
        (b"\0" * 6000, "the pixel data ends after 6000 of the 12352 bytes"),
        ((b"\0" + b"\0" * 192) * 63 + b"\x07" + b"\0" * 192, "row filter type 7 is unknown"),
    ],
    ids=["inflates-beyond", "ends-early", "bad-filter"],
)
def test_a_png_stream_that_does_not_match_its_header_is_corrupt(raw: bytes, reason: str) -> None:
    with pytest.raises(UndecodableImage, match=reason):
        inspect_image(png_with_stream(64, 64, raw))


def test_structure_checks_catch_what_a_full_decode_caught() -> None:
    good = png((640, 480))
    assert inspect_image(good).verified == "png-stream"
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    with pytest.raises(UndecodableImage, match="checksum"):
        inspect_image(bytes(flipped))
    buffer = io.BytesIO()
    Image.effect_noise((640, 480), 40).convert("RGB").save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    assert inspect_image(jpeg).verified == "jpeg-draft"
    with pytest.raises(UndecodableImage, match="truncated"):
        inspect_image(jpeg[: len(jpeg) // 2])
    interlaced = io.BytesIO()
    Image.new("RGBA", (33, 17), "blue").save(interlaced, format="PNG", interlace=1)
    assert inspect_image(interlaced.getvalue()).verified == "png-stream"
    gif = io.BytesIO()
    Image.new("P", (40, 30)).save(gif, format="GIF")
    assert inspect_image(gif.getvalue()).verified == "pixels"
    with pytest.raises(UndecodableImage, match="no header Pillow knows"):
        inspect_image(b"GIF89a but not really an image")


@pytest.mark.parametrize("max_decodes", [1, 2])
async def test_decodes_are_bounded_while_downloads_run_wide(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch, max_decodes: int
) -> None:
    # The real inspection, held: each decode keeps its slot until `max_decodes` of them
    # overlap, so the peak is reached by construction, not by timing. An implementation
    # that decodes fewer at once makes each wait time out (and the peak falls short).
    from flux2_pipeline.media import sync as sync_module

    real = sync_module.inspect_image
    running, peak, overlapped = [0], [0], threading.Condition()

    def held(data: bytes, *limits: object) -> object:
        with overlapped:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            overlapped.notify_all()
            overlapped.wait_for(lambda: peak[0] >= max_decodes, timeout=5)
        try:
            return real(data, *limits)
        finally:
            with overlapped:
                running[0] -= 1

    monkeypatch.setattr(sync_module, "inspect_image", held)

    def serve(request: httpx.Request) -> httpx.Response:
        side = 16 + int(request.url.path.removeprefix("/img-").removesuffix(".png"))
        return httpx.Response(200, content=png((side, side)), headers={"content-type": "image/png"})

    urls = [f"http://img.test/img-{i}.png" for i in range(8)]
    _, records = await sync(
        store,
        refs(*urls),
        httpx.MockTransport(serve),
        AddressPolicy(allow_loopback=True),
        max_concurrency=8,
        max_decodes=max_decodes,
    )
    assert [record.status for record in records] == ["ok"] * 8, records
    assert peak[0] == max_decodes
