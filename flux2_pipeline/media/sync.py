"""Bring a partition's images into the store: fetch what is missing, reuse what is there.

The reuse key is the URL (redacted, as the manifest stores it). An image is not fetched
again when the partition's previous manifest lists its URL as `ok` and the stored file is
still there with the recorded size. RunComfy output URLs name one job's output and never
change; a reference URL is assumed to keep its content too (delete the manifest to force
a refetch). Within one run each distinct URL is fetched once, however many rows use it.
Bytes are stored by their sha256, so two URLs with the same content share one file.

Untrusted URLs go through `flux2_pipeline.net.GuardedFetcher` under `policy`; at most
`max_concurrency` downloads and `max_decodes` image decodes run at once, and no image
with more than `max_pixels` pixels is decoded. Any problem with one URL is a `failed`
manifest row with a one-line, redacted reason, never an exception.

Example::

    report = sync_images_blocking(
        image_refs(results), store, read_manifest(manifest_path),
        policy=AddressPolicy.for_api(base_url),
    )
    write_manifest(manifest_path, report.records)
    report.downloaded, report.reused, report.failed
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import httpx

from flux2_pipeline.media.errors import CorruptImage, ImageFetchError, ImageTooLarge
from flux2_pipeline.media.fetch import ImageFetcher
from flux2_pipeline.media.manifest import ImageRecord, ImageRef
from flux2_pipeline.media.store import ImageStore
from flux2_pipeline.media.verify import (
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    TooManyPixels,
    UndecodableImage,
    inspect_image,
)
from flux2_pipeline.net import (
    AddressPolicy,
    FetchLimits,
    GuardedFetcher,
    Resolver,
    redact_text,
    redact_url,
    system_resolver,
)
from flux2_pipeline.paths import file_size

DEFAULT_CONCURRENCY = 16
DEFAULT_MAX_DECODES = 2
"""Image decodes at once: each may hold `max_pixels` x 4 bytes (160 MB at 40 MP)."""

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class _Budget:
    downloads: asyncio.Semaphore
    decodes: asyncio.Semaphore
    max_pixels: int


def _shown_url(url: object) -> str:
    # A null URL in the results still gets its failed row (the column is not nullable).
    return redact_url(url) if isinstance(url, str) else ""


def _reusable(previous: Sequence[ImageRecord], store: ImageStore) -> dict[str, ImageRecord]:
    found: dict[str, ImageRecord] = {}
    for record in previous:
        if not record.ok or record.path is None or record.url in found:
            continue
        if file_size(store.resolve(record.path)) == record.bytes:
            found[record.url] = record
    return found


async def _verify(url: str, data: bytes, content_type: str, budget: _Budget) -> ImageInfo:
    try:
        async with budget.decodes:
            return await asyncio.to_thread(inspect_image, data, budget.max_pixels)
    except TooManyPixels as exc:
        raise ImageTooLarge(url, str(exc)) from None
    except UndecodableImage as exc:
        raise CorruptImage(url, f"{exc} (content type {content_type})") from None


async def _download(
    url: str, fetcher: ImageFetcher, store: ImageStore, budget: _Budget
) -> _Outcome:
    try:
        async with budget.downloads:
            fetched = await fetcher.fetch(url)
        info = await _verify(url, fetched.data, fetched.content_type, budget)
        stored = await asyncio.to_thread(store.put, fetched.data, info.sha256, info.ext)
    except ImageFetchError as exc:
        return _Outcome(error=f"{exc.kind}: {exc.reason}")
    except Exception as exc:  # one URL must never take the step (and its manifest) down
        logger.warning("image %s failed unexpectedly", _shown_url(url), exc_info=True)
        detail = " ".join(redact_text(str(exc)).split()) or "no detail"
        return _Outcome(error=f"error: {type(exc).__name__}: {detail}")
    template = ImageRecord(
        row_id="",
        request_id=None,
        role="",
        index=0,
        url=_shown_url(url),
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
    policy: AddressPolicy | None = None,
    limits: FetchLimits | None = None,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    max_decodes: int = DEFAULT_MAX_DECODES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_done: Callable[[int, int], None] | None = None,
    resolver: Resolver = system_resolver,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SyncReport:
    """Store every image of `refs`; failures become `failed` records, never exceptions.

    `policy` decides which addresses may be fetched (default: public addresses only;
    `AddressPolicy.for_api(base_url)` allows loopback for the emulator). At most
    `max_concurrency` downloads are in flight. `on_done(done, total)` is called after
    each distinct URL settles. `resolver` and `transport` are the test seams.
    """
    reusable = _reusable(previous, store)
    shown = {ref.url: _shown_url(ref.url) for ref in refs}
    urls = list(dict.fromkeys(ref.url for ref in refs))
    outcomes: dict[str, _Outcome] = {
        url: _Outcome(template=reusable[shown[url]]) for url in urls if shown[url] in reusable
    }
    todo = [url for url in urls if url not in outcomes]
    budget = _Budget(asyncio.Semaphore(max_concurrency), asyncio.Semaphore(max_decodes), max_pixels)
    async with GuardedFetcher(
        policy,
        limits,
        resolver=resolver,
        transport=transport,
        max_connections=max_concurrency,
    ) as guarded:
        fetcher = ImageFetcher(guarded)
        tasks = {url: asyncio.ensure_future(_download(url, fetcher, store, budget)) for url in todo}
        done = len(outcomes)
        for future in asyncio.as_completed(list(tasks.values())):
            await future
            done += 1
            if on_done is not None:
                on_done(done, len(urls))
        outcomes.update({url: task.result() for url, task in tasks.items()})
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
                url=shown[ref.url],
                error=None,
            )
        else:
            record = ImageRecord(
                ref.row_id,
                ref.request_id,
                ref.role,
                ref.index,
                shown[ref.url],
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
    policy: AddressPolicy | None = None,
    limits: FetchLimits | None = None,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    max_decodes: int = DEFAULT_MAX_DECODES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_done: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """`sync_images` on a fresh event loop, for synchronous callers (a Dagster step)."""
    return asyncio.run(
        sync_images(
            refs,
            store,
            previous,
            policy=policy,
            limits=limits,
            max_concurrency=max_concurrency,
            max_decodes=max_decodes,
            max_pixels=max_pixels,
            on_done=on_done,
        )
    )
