"""Bring a partition's images into the store: fetch what is missing, reuse what is there.

The reuse key is the URL. An image is not fetched again when the partition's previous
manifest lists its URL as `ok` and the stored file is still there with the recorded size.
RunComfy output URLs name one job's output and never change; a reference URL is assumed
to keep its content too (delete the manifest to force a refetch). Within one run each
distinct URL is fetched once, however many rows use it. Bytes are stored by their sha256,
so two URLs with the same content share one file.

Example::

    report = sync_images_blocking(image_refs(results), store, read_manifest(manifest_path))
    write_manifest(manifest_path, report.records)
    report.downloaded, report.reused, report.failed
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import httpx

from flux2_pipeline.media.errors import CorruptImage, ImageFetchError
from flux2_pipeline.media.fetch import FetchLimits, ImageFetcher
from flux2_pipeline.media.manifest import ImageRecord, ImageRef
from flux2_pipeline.media.store import ImageStore
from flux2_pipeline.media.verify import UndecodableImage, inspect_image
from flux2_pipeline.paths import file_size

DEFAULT_CONCURRENCY = 16


@dataclass
class SyncReport:
    """The manifest records of one sync, in reference order, and what it took."""

    records: list[ImageRecord] = field(default_factory=list)
    downloaded: int = 0
    reused: int = 0
    bytes_downloaded: int = 0

    @property
    def stored(self) -> int:
        """Manifest rows whose image is stored and verified."""
        return sum(1 for record in self.records if record.ok)

    @property
    def failed(self) -> int:
        """Manifest rows whose image is missing."""
        return sum(1 for record in self.records if not record.ok)

    @property
    def bytes_stored(self) -> int:
        """Bytes of the distinct stored images this manifest points at."""
        sizes = {r.sha256: r.bytes or 0 for r in self.records if r.ok and r.sha256}
        return sum(sizes.values())

    def failures(self) -> list[ImageRecord]:
        """The failed records, in order."""
        return [record for record in self.records if not record.ok]


@dataclass(frozen=True, slots=True)
class _Outcome:
    template: ImageRecord | None = None
    error: str | None = None
    downloaded: bool = False


def _reusable(previous: Sequence[ImageRecord], store: ImageStore) -> dict[str, ImageRecord]:
    found: dict[str, ImageRecord] = {}
    for record in previous:
        if not record.ok or record.path is None or record.url in found:
            continue
        if file_size(store.resolve(record.path)) == record.bytes:
            found[record.url] = record
    return found


async def _download(
    url: str, fetcher: ImageFetcher, store: ImageStore, gate: asyncio.Semaphore
) -> _Outcome:
    try:
        async with gate:
            fetched = await fetcher.fetch(url)
        try:
            info = await asyncio.to_thread(inspect_image, fetched.data)
        except UndecodableImage as exc:
            raise CorruptImage(url, f"{exc} (content type {fetched.content_type})") from exc
        stored = await asyncio.to_thread(store.put, fetched.data, info.sha256, info.ext)
    except ImageFetchError as exc:
        return _Outcome(error=f"{exc.kind}: {exc.reason}")
    template = ImageRecord(
        row_id="",
        request_id=None,
        role="",
        index=0,
        url=url,
        status="ok",
        sha256=info.sha256,
        path=stored.relative,
        width=info.width,
        height=info.height,
        format=info.format,
        bytes=info.bytes,
    )
    return _Outcome(template=template, downloaded=True)


async def sync_images(
    refs: Sequence[ImageRef],
    store: ImageStore,
    previous: Sequence[ImageRecord] = (),
    *,
    http: httpx.AsyncClient | None = None,
    limits: FetchLimits | None = None,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    on_done: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """Store every image of `refs`; failures become `failed` records, never exceptions.

    At most `max_concurrency` downloads are in flight. `on_done(done, total)` is called
    after each distinct URL settles.
    """
    limits = limits or FetchLimits()
    reusable = _reusable(previous, store)
    urls = list(dict.fromkeys(ref.url for ref in refs))
    outcomes: dict[str, _Outcome] = {
        url: _Outcome(template=reusable[url]) for url in urls if url in reusable
    }
    todo = [url for url in urls if url not in outcomes]
    own_client = http is None
    client = http or httpx.AsyncClient(
        limits=httpx.Limits(max_connections=max_concurrency), follow_redirects=True
    )
    gate = asyncio.Semaphore(max_concurrency)
    fetcher = ImageFetcher(client, limits)
    try:
        tasks = {url: asyncio.ensure_future(_download(url, fetcher, store, gate)) for url in todo}
        done = len(outcomes)
        for future in asyncio.as_completed(list(tasks.values())):
            await future
            done += 1
            if on_done is not None:
                on_done(done, len(urls))
        outcomes.update({url: task.result() for url, task in tasks.items()})
    finally:
        if own_client:
            await client.aclose()
    report = SyncReport()
    for outcome in outcomes.values():
        if outcome.downloaded and outcome.template is not None:
            report.downloaded += 1
            report.bytes_downloaded += outcome.template.bytes or 0
        elif outcome.template is not None:
            report.reused += 1
    for ref in refs:
        outcome = outcomes[ref.url]
        if outcome.template is not None:
            record = replace(
                outcome.template,
                row_id=ref.row_id,
                request_id=ref.request_id,
                role=ref.role,
                index=ref.index,
                url=ref.url,
                error=None,
            )
        else:
            record = ImageRecord(
                ref.row_id,
                ref.request_id,
                ref.role,
                ref.index,
                ref.url,
                "failed",
                error=outcome.error,
            )
        report.records.append(record)
    return report


def sync_images_blocking(
    refs: Sequence[ImageRef],
    store: ImageStore,
    previous: Sequence[ImageRecord] = (),
    *,
    limits: FetchLimits | None = None,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    on_done: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """`sync_images` on a fresh event loop, for synchronous callers (a Dagster step)."""
    return asyncio.run(
        sync_images(
            refs,
            store,
            previous,
            limits=limits,
            max_concurrency=max_concurrency,
            on_done=on_done,
        )
    )
