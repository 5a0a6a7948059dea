"""The media layer against `httpx.MockTransport`: every way one image can fail, and reuse."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from PIL import Image

from flux2_pipeline.media import (
    FetchLimits,
    ImageRecord,
    ImageRef,
    ImageStore,
    SyncReport,
    read_manifest,
    sync_images,
    write_manifest,
)
from flux2_pipeline.media.sync import WINDOW_REFS
from tests.helpers.images import png
from tests.helpers.net import LOOPBACK, to_loopback

GOOD = png()
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
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
    manifest: Path,
    previous: Path | None = None,
    **limits: int,
) -> SyncReport:
    return await sync_images(
        wanted,
        store,
        manifest,
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
    manifest = tmp_path / "m.parquet"
    report = await run(server, store, wanted, manifest, max_bytes=4000, attempts=2)
    records = read_manifest(manifest)
    assert [r.url for r in records] == [ref.url for ref in wanted]  # reference order
    by_url = {r.url.rsplit("/", 1)[1]: r for r in records}

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
    assert [r.url for r in report.first_failures] == [r.url for r in records if not r.ok]


async def test_the_size_cap_holds_without_a_content_length(
    store: ImageStore, tmp_path: Path
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield BIG[:3000]
        yield BIG[3000:]

    def chunked(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "image/png"})

    await sync_images(
        refs("a.png"),
        store,
        tmp_path / "m.parquet",
        policy=LOOPBACK,
        resolver=to_loopback,
        transport=httpx.MockTransport(chunked),
        limits=FetchLimits(max_bytes=4000),
    )
    (record,) = read_manifest(tmp_path / "m.parquet")
    assert record.error == (
        "too_large: more than the 4000-byte cap (stopped reading https://img.test/a.png)"
    )
    assert stored_files(store.root) == []


async def test_transient_errors_are_retried_then_succeed(store: ImageStore, tmp_path: Path) -> None:
    server = Server()
    await run(server, store, refs("flaky.png"), tmp_path / "m.parquet", attempts=3)
    assert read_manifest(tmp_path / "m.parquet")[0].ok
    assert server.hits["/flaky.png"] == 3


async def test_stored_images_are_reused_by_url_and_same_bytes_share_one_file(
    store: ImageStore, tmp_path: Path
) -> None:
    server = Server()
    wanted = refs("good.png", "same.png", "good.png", "other.jpg")
    manifest = tmp_path / "m.parquet"
    first = await run(server, store, wanted, manifest)
    assert (first.downloaded, first.reused, first.stored) == (3, 0, 4)
    assert server.hits == {"/good.png": 1, "/same.png": 1, "/other.jpg": 1}
    assert len(stored_files(store.root)) == 2  # good.png and same.png are the same bytes
    assert first.bytes_stored == sum(p.stat().st_size for p in stored_files(tmp_path / "images"))
    previous = read_manifest(manifest)
    assert [(r.row_id, r.url) for r in previous] == [(ref.row_id, ref.url) for ref in wanted]

    # The previous manifest is the one being replaced: it is read before it is.
    second = await run(server, store, wanted, manifest, previous=manifest)
    assert (second.downloaded, second.reused) == (0, 3)
    assert server.hits == {"/good.png": 1, "/same.png": 1, "/other.jpg": 1}
    assert read_manifest(manifest) == previous

    # A stored file that disappeared is fetched again.
    jpg = next(r for r in previous if r.url.endswith("other.jpg"))
    assert jpg.path is not None and jpg.path.endswith(".jpg")
    store.resolve(jpg.path).unlink()
    third = await run(server, store, wanted, manifest, previous=manifest)
    assert (third.downloaded, third.reused) == (1, 2)
    assert server.hits["/other.jpg"] == 2
    assert read_manifest(manifest) == previous


async def test_records_keep_reference_order_and_a_url_met_again_later_is_not_fetched_again(
    store: ImageStore, tmp_path: Path
) -> None:
    # The first image is the slowest, and more references than the window wait behind it
    # (reused from the previous manifest); its URL and a failed one come back at the end,
    # long after they left the window: their outcomes are found on disk, not fetched.
    stored = store.put(GOOD, GOOD_SHA, "png")
    filler = [
        ImageRef(f"fill-{i}", None, "source", 0, f"https://img.test/fill-{i}.png")
        for i in range(WINDOW_REFS + 100)
    ]
    previous = tmp_path / "m.parquet"
    write_manifest(
        previous,
        [
            ImageRecord(
                "old",
                None,
                "source",
                0,
                ref.url,
                "ok",
                GOOD_SHA,
                stored.relative,
                32,
                24,
                "PNG",
                len(GOOD),
            )
            for ref in filler
        ],
    )
    hits: dict[str, int] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        hits[request.url.path] = hits.get(request.url.path, 0) + 1
        if request.url.path == "/slow.png":
            await asyncio.sleep(0.2)
            return httpx.Response(200, content=GOOD, headers={"content-type": "image/png"})
        return httpx.Response(404)

    slow, gone = refs("slow.png", "gone.png")
    again = [replace(slow, row_id="again-0"), replace(gone, row_id="again-1")]
    wanted = [slow, gone, *filler, *again]
    progress: list[tuple[int, int]] = []
    report = await sync_images(
        iter(wanted),
        store,
        previous,
        previous,
        policy=LOOPBACK,
        resolver=to_loopback,
        transport=httpx.MockTransport(handler),
        limits=FetchLimits(attempts=1),
        max_concurrency=4,
        on_done=lambda settled, met: progress.append((settled, met)),
    )
    written = read_manifest(previous)
    assert [(r.row_id, r.url) for r in written] == [(ref.row_id, ref.url) for ref in wanted]
    assert hits == {"/slow.png": 1, "/gone.png": 1}
    assert written[-2].ok and written[-2].sha256 == written[0].sha256
    assert written[-1].error == written[1].error and (written[1].error or "").startswith(
        "unavailable: HTTP 404"
    )
    assert (report.downloaded, report.reused, report.stored, report.failed) == (
        1,
        len(filler),
        len(filler) + 2,
        2,
    )
    assert report.bytes_stored == len(GOOD)  # every stored record points at one file
    assert [r.row_id for r in report.first_failures] == ["row-1", "again-1"]
    assert progress[-1] == (len(filler) + 2, len(filler) + 2)
    assert len(progress) == len(filler) + 2  # once per distinct URL


async def test_a_stopped_or_broken_sync_leaves_the_previous_manifest_and_nothing_running(
    store: ImageStore, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.parquet"
    write_manifest(manifest, [ImageRecord("old", None, "edited", 0, "https://img.test/o", "ok")])
    before = manifest.read_bytes()
    hanging: set[str] = set()
    cancelled: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if not request.url.path.startswith("/hang"):
            return httpx.Response(404)
        hanging.add(request.url.path)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(request.url.path)
            raise
        raise AssertionError("unreachable")

    def sync(wanted: Iterator[ImageRef]) -> asyncio.Task[SyncReport]:
        return asyncio.ensure_future(
            sync_images(
                wanted,
                store,
                manifest,
                manifest,
                policy=LOOPBACK,
                resolver=to_loopback,
                transport=httpx.MockTransport(handler),
                limits=FetchLimits(attempts=1),
            )
        )

    def results(fail: bool) -> Iterator[ImageRef]:
        yield from refs(*(("gone.png",) if fail else ("hang-0.png", "hang-1.png")))
        yield from (ImageRef("x", None, "source", i, f"https://img.test/{i}") for i in range(2000))
        if fail:
            raise OSError("results file damaged")

    # A stop (the run is terminated) while downloads hang: every one is cancelled, not
    # only the one the sync waits for.
    async def both_hang() -> None:
        while len(hanging) < 2:
            await asyncio.sleep(0.01)

    stopped = sync(results(fail=False))
    await asyncio.wait_for(both_hang(), timeout=10)
    stopped.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopped
    assert sorted(cancelled) == ["/hang-0.png", "/hang-1.png"]
    # The results file breaks half way through.
    with pytest.raises(OSError, match="results file damaged"):
        await sync(results(fail=True))
    assert manifest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temporary file
