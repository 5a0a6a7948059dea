"""The media layer against `httpx.MockTransport`: every way one image can fail, and reuse."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Sequence
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
    read_manifest,
    sync_images,
    write_manifest,
)

LOOPBACK = AddressPolicy(allow_loopback=True)


async def to_loopback(host: str, port: int) -> list[str]:
    """The stub resolver: every test host is on loopback (MockTransport answers anyway)."""
    return ["127.0.0.1"]


def png(size: tuple[int, int] = (32, 24), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = png()
BIG = png((400, 400), "blue") + b"\0" * 5000  # valid PNG with trailing bytes: just large


class Server:
    """A MockTransport handler that serves fixed routes and counts hits."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.flaky_left = 2

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.hits[path] = self.hits.get(path, 0) + 1
        if path in ("/good.png", "/same.png"):
            return httpx.Response(200, content=GOOD, headers={"content-type": "image/png"})
        if path == "/other.jpg":
            buffer = io.BytesIO()
            Image.new("RGB", (10, 10), "green").save(buffer, format="JPEG")
            return httpx.Response(
                200, content=buffer.getvalue(), headers={"content-type": "image/jpeg"}
            )
        if path == "/corrupt.png":
            return httpx.Response(
                200, content=GOOD[:40] + b"garbage" * 20, headers={"content-type": "image/png"}
            )
        if path == "/page.png":
            return httpx.Response(
                200, text="<html>login</html>", headers={"content-type": "text/html"}
            )
        if path == "/big.png":
            return httpx.Response(200, content=BIG, headers={"content-type": "image/png"})
        if path == "/flaky.png":
            if self.flaky_left > 0:
                self.flaky_left -= 1
                return httpx.Response(503, headers={"retry-after": "0"})
            return httpx.Response(200, content=GOOD, headers={"content-type": "image/png"})
        if path == "/down.png":
            return httpx.Response(502)
        return httpx.Response(404, json={"error": "expired"})


def refs(*names: str) -> list[ImageRef]:
    return [
        ImageRef(f"row-{i}", f"req-{i}", "edited", 0, f"https://img.test/{name}")
        for i, name in enumerate(names)
    ]


async def run(
    server: Server,
    store: ImageStore,
    wanted: list[ImageRef],
    previous: Sequence[ImageRecord] = (),
    **limits: int,
) -> SyncReport:
    return await sync_images(
        wanted,
        store,
        previous,
        policy=LOOPBACK,
        resolver=to_loopback,
        transport=httpx.MockTransport(server),
        limits=FetchLimits(backoff_base=0.0, **limits),
        max_concurrency=4,
    )


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", base=tmp_path)


async def test_each_failure_is_marked_with_its_reason_and_nothing_partial_stays(
    store: ImageStore, tmp_path: Path
) -> None:
    server = Server()
    wanted = refs("good.png", "missing.png", "corrupt.png", "page.png", "big.png", "down.png")
    report = await run(server, store, wanted, max_bytes=4000, attempts=2)
    by_url = {r.url.rsplit("/", 1)[1]: r for r in report.records}

    good = by_url["good.png"]
    assert good.ok and (good.width, good.height, good.format, good.bytes) == (
        32,
        24,
        "PNG",
        len(GOOD),
    )
    assert good.path == f"images/{good.sha256[:2]}/{good.sha256}.png"
    assert by_url["missing.png"].error.startswith("unavailable: HTTP 404")
    assert "expired" in by_url["missing.png"].error
    assert by_url["corrupt.png"].error.startswith("corrupt: ")
    assert (
        by_url["page.png"].error == "not_an_image: content type 'text/html' is not an image/* type"
    )
    assert by_url["big.png"].error.startswith("too_large: ")
    assert by_url["down.png"].error.startswith("unavailable: HTTP 502")
    assert "gave up after 2 attempts" in by_url["down.png"].error
    assert server.hits["/down.png"] == 2 and server.hits["/missing.png"] == 1
    for name in ("missing.png", "corrupt.png", "page.png", "big.png", "down.png"):
        record = by_url[name]
        assert record.status == "failed" and record.sha256 is None and record.path is None
    # Only the good image is on disk: no partial file, no temporary file.
    assert stored_files(tmp_path / "images") == [tmp_path / good.path]
    assert (report.stored, report.failed, report.downloaded) == (1, 5, 1)


async def test_the_size_cap_holds_without_a_content_length(store: ImageStore) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield BIG[:3000]
        yield BIG[3000:]

    def chunked(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "image/png"})

    report = await sync_images(
        refs("a.png"),
        store,
        policy=LOOPBACK,
        resolver=to_loopback,
        transport=httpx.MockTransport(chunked),
        limits=FetchLimits(max_bytes=4000),
    )
    (record,) = report.records
    assert record.error == (
        "too_large: more than the 4000-byte cap (stopped reading https://img.test/a.png)"
    )
    assert stored_files(store.root) == []


async def test_transient_errors_are_retried_then_succeed(store: ImageStore) -> None:
    server = Server()
    report = await run(server, store, refs("flaky.png"), attempts=3)
    assert report.records[0].ok
    assert server.hits["/flaky.png"] == 3


async def test_stored_images_are_reused_by_url_and_same_bytes_share_one_file(
    store: ImageStore, tmp_path: Path
) -> None:
    server = Server()
    wanted = refs("good.png", "same.png", "good.png", "other.jpg")
    first = await run(server, store, wanted)
    assert (first.downloaded, first.reused, first.stored) == (3, 0, 4)
    assert server.hits == {"/good.png": 1, "/same.png": 1, "/other.jpg": 1}
    assert len(stored_files(store.root)) == 2  # good.png and same.png are the same bytes
    manifest = tmp_path / "m.parquet"
    write_manifest(manifest, first.records)
    previous = read_manifest(manifest)
    assert previous == first.records

    second = await run(server, store, wanted, previous)
    assert (second.downloaded, second.reused) == (0, 3)
    assert server.hits == {"/good.png": 1, "/same.png": 1, "/other.jpg": 1}
    assert second.records == first.records

    # A stored file that disappeared is fetched again.
    jpg = next(r for r in previous if r.url.endswith("other.jpg"))
    assert jpg.path is not None and jpg.path.endswith(".jpg")
    store.resolve(jpg.path).unlink()
    third = await run(server, store, wanted, previous)
    assert (third.downloaded, third.reused) == (1, 2)
    assert server.hits["/other.jpg"] == 2
