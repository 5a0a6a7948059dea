"""Bring a partition's images into the store: fetch what is missing, reuse what is there.

The reuse key is the URL (redacted, as the manifest stores it). An image is not fetched
again when the previous manifest lists its URL as `ok` and the stored file is still there
with the recorded size. RunComfy output URLs name one job's output and never change; a
reference URL is assumed to keep its content too (delete the manifest to force a
refetch). Within one run each distinct URL is fetched once, however many rows use it.
Bytes are stored by their sha256, so two URLs with the same content share one file.

Memory does not grow with the partition: references are read as they come, at most
`WINDOW_REFS` of them wait for their image, each record goes to the manifest (in
reference order) as soon as the ones before it are written, and what must be remembered
across the whole partition (the previous manifest by URL, the URLs already settled, the
stored digests) lives in an on-disk index. The report keeps counts and the first failures.

Untrusted URLs go through `flux2_pipeline.net.GuardedFetcher` under `policy`; at most
`max_concurrency` downloads (each holding its bytes until stored) and `max_decodes`
verifications run at once, and the decodes among them share one `PixelBudget` (default:
`max_pixels`), so memory is bounded by pixels, not by a number of images. An image with
more than `max_pixels` pixels (the decode ceiling) is stored without any decode, its
manifest row saying why (`note`). Any problem with one URL is a `failed` manifest row
with a one-line, redacted reason, never an exception.

Outputs expire: the API keeps an output for days, not forever. When an edited image's URL
answers 403, 404 or 410 and a `refresh` is given, the API is asked once per job for fresh
URLs (its `/result`), and the image is fetched from there through the same fetcher; the
manifest records the URL it came from. If the API no longer serves it either, the row is
`expired` (`EXPIRED_ERROR`): the job was paid and nothing here submits it again. Reference
images (role `source`) are not the API's outputs and are never refreshed.

Example::

    report = sync_images_blocking(
        iter_image_refs(iter_parquet(results_path)), store, manifest_path,
        previous=manifest_path, policy=AddressPolicy.for_api(base_url),
    )
    report.downloaded, report.reused, report.failed, report.first_failures
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec

import httpx
import pyarrow as pa
from upath import UPath

from flux2_pipeline.media.budget import PixelBudget
from flux2_pipeline.media.download import ImageFetcher
from flux2_pipeline.media.errors import (
    CorruptImage,
    ImageFetchError,
    ImageUnavailable,
)
from flux2_pipeline.media.manifest import ImageRecord, ImageRef, ManifestWriter, iter_manifest
from flux2_pipeline.media.store import ImageStore
from flux2_pipeline.media.verify import (
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    UndecodableImage,
    inspect_image,
)
from flux2_pipeline.net import (
    AddressPolicy,
    FetchLimits,
    GuardedFetcher,
    Resolver,
    redact_text,
    system_resolver,
)
from flux2_pipeline.paths import INDEX_CHUNK, DiskIndex, IndexKey

DEFAULT_CONCURRENCY = 16
DEFAULT_MAX_DECODES = 2
"""Image verifications at once (CPU); the memory of their decodes is the pixel budget's."""
WINDOW_REFS = 1024
"""References read ahead of the first one not yet written to the manifest (at least four
per download slot): a slow image holds back the manifest, and the downloads behind it
only once this many references wait."""
FAILURES_KEPT = 5
"""Failed records a `SyncReport` keeps as examples; the manifest has them all."""
GONE_STATUSES = frozenset({403, 404, 410})
"""HTTP statuses with which an output URL says it is gone (signed URL or storage expired)."""
EXPIRED = "expired"
"""The manifest status of an output image the API no longer serves."""
EXPIRED_ERROR = (
    "the output expired at the API (its URL and a fresh one from /result are gone); the "
    "row's job was paid; to get a new image the row must be submitted again, which is new "
    "spend"
)

OutputRefresh = Callable[[str], Awaitable[Sequence[str] | None]]
"""Fresh output URLs of a job, by request id, from the API; None when it has none any more."""

logger = logging.getLogger(__name__)
_P = ParamSpec("_P")


@dataclass
class SyncReport:
    """What one sync wrote to its manifest and what it took: counts, and the first failures.

    Memory does not grow with the partition: the records themselves are in the manifest.

    Example::

        report.stored, report.failed, report.images  # manifest rows: ok, failed, all
        report.downloaded, report.reused             # distinct URLs fetched, reused
        [f"{r.row_id}: {r.error}" for r in report.first_failures]
    """

    downloaded: int = 0
    reused: int = 0
    not_decoded: int = 0
    """Stored images above the decode ceiling: described from their header, no thumbnail."""
    bytes_downloaded: int = 0
    stored: int = 0
    failed: int = 0
    """Manifest rows `failed` (not counting `expired` ones)."""
    expired: int = 0
    """Manifest rows `expired`: outputs the API no longer serves (paid, not resubmitted)."""
    refreshed: int = 0
    """Jobs whose fresh output URLs were asked of the API (one `/result` each)."""
    bytes_stored: int = 0
    """Bytes of the distinct stored images (by sha256) the manifest points at."""
    first_failures: list[ImageRecord] = field(default_factory=list)
    """The first `FAILURES_KEPT` failed records, in manifest order."""
    first_expired: list[ImageRecord] = field(default_factory=list)
    """The first `FAILURES_KEPT` expired records, in manifest order."""

    @property
    def images(self) -> int:
        """Manifest rows written: one per image reference."""
        return self.stored + self.failed + self.expired


@dataclass(frozen=True, slots=True)
class _Outcome:
    template: ImageRecord | None = None
    error: str | None = None
    downloaded: bool = False
    gone: bool = False
    """The URL answered one of `GONE_STATUSES` (for an output: perhaps expired)."""
    expired: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.template is None:
            return {"error": self.error, "expired": self.expired}
        return {"record": self.template.row()}

    @staticmethod
    def from_json(found: dict[str, Any]) -> _Outcome:
        record = found.get("record")
        if record is None:
            return _Outcome(error=found["error"], expired=bool(found.get("expired")))
        return _Outcome(ImageRecord(**record))


@dataclass(frozen=True, slots=True)
class _Budget:
    downloads: asyncio.Semaphore
    decodes: asyncio.Semaphore
    max_pixels: int
    pixels: PixelBudget


def _shown_url(url: object) -> str:
    # A null URL in the results still gets its failed row (the column is not nullable).
    return redact_text(url) if isinstance(url, str) else ""


def _url_key(url: object) -> str:
    # Settled URLs are indexed on disk by digest: a signed URL's secret never lands there.
    if not isinstance(url, str):
        return "null"
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


class _Known:
    """What a sync remembers across the partition, on disk: the previous manifest's stored
    images by URL, the outcome of each URL settled, and the digests already counted.

    New entries are written in chunks of `INDEX_CHUNK` (one transaction each, not one per
    URL); the chunk being filled answers lookups too.
    """

    def __init__(self, previous: Path | UPath | None) -> None:
        self._index = DiskIndex()
        self._pending: dict[IndexKey, Any] = {}
        if previous is None:
            return
        try:
            self._index.put_all(
                (key, record.row())
                for record in iter_manifest(previous)
                if record.ok and record.path is not None
                for key in _previous_keys(record)
            )
        except (pa.ArrowException, OSError):
            self._index.clear()  # a damaged manifest only costs a re-download
        except BaseException:
            self._index.close()
            raise

    def _get(self, key: IndexKey) -> Any:
        found = self._pending.get(key)
        return self._index.get(key) if found is None else found

    def _put(self, key: IndexKey, value: Any) -> None:
        self._pending[key] = value
        if len(self._pending) >= INDEX_CHUNK:
            self._index.put_all(self._pending.items())
            self._pending = {}

    def reusable(self, ref: ImageRef, store: ImageStore) -> ImageRecord | None:
        """The previous record of `ref`'s URL (or, for an output, of the same job's output
        at the same index, which may have come from a refreshed URL) if its stored file is
        still whole."""
        found = self._index.get(("previous", _shown_url(ref.url)))
        if found is None and ref.role == "edited" and ref.request_id is not None:
            found = self._index.get(("output", ref.request_id, str(ref.index)))
        if found is None:
            return None
        record = ImageRecord(**found)
        size = store.size(record.path or "")
        return record if size is not None and size == record.bytes else None

    def settled(self, key: str) -> _Outcome | None:
        found = self._get(("settled", key))
        return None if found is None else _Outcome.from_json(found)

    def settle(self, key: str, outcome: _Outcome) -> None:
        self._put(("settled", key), outcome.to_json())

    def first_sight(self, sha256: str) -> bool:
        """True the first time a digest is asked about."""
        if self._get(("sha256", sha256)) is not None:
            return False
        self._put(("sha256", sha256), True)
        return True

    def close(self) -> None:
        self._index.close()


def _previous_keys(record: ImageRecord) -> list[IndexKey]:
    keys: list[IndexKey] = [("previous", record.url)]
    if record.role == "edited" and record.request_id is not None:
        keys.append(("output", record.request_id, str(record.index)))
    return keys


async def _verify(url: str, data: bytes, content_type: str, budget: _Budget) -> ImageInfo:
    try:
        async with budget.decodes:
            return await asyncio.to_thread(inspect_image, data, budget.max_pixels, budget.pixels)
    except UndecodableImage as exc:
        raise CorruptImage(url, f"{exc} (content type {content_type})") from None


async def _download(
    url: str, fetcher: ImageFetcher, store: ImageStore, budget: _Budget
) -> _Outcome:
    try:
        # The slot is held until the bytes are stored: at most `max_concurrency` images
        # are in memory, however many wait for a decode.
        async with budget.downloads:
            fetched = await fetcher.fetch(url)
            info = await _verify(url, fetched.data, fetched.content_type, budget)
            stored = await asyncio.to_thread(store.put, fetched.data, info.sha256, info.ext)
    except ImageFetchError as exc:
        gone = isinstance(exc, ImageUnavailable) and exc.status in GONE_STATUSES
        return _Outcome(error=f"{exc.kind}: {exc.reason}", gone=gone)
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
        verified=info.verified,
        note=info.note,
    )
    return _Outcome(template=template, downloaded=True)


def _record(ref: ImageRef, outcome: _Outcome) -> ImageRecord:
    shown = _shown_url(ref.url)
    if outcome.template is None:
        status = EXPIRED if outcome.expired else "failed"
        return ImageRecord(
            ref.row_id, ref.request_id, ref.role, ref.index, shown, status, error=outcome.error
        )
    return replace(
        outcome.template,
        row_id=ref.row_id,
        request_id=ref.request_id,
        role=ref.role,
        index=ref.index,
        # A refreshed output keeps the URL it was fetched from.
        url=outcome.template.url if outcome.template.url else shown,
        error=None,
    )


_Pending = _Outcome | asyncio.Task[_Outcome]


class _Sync:
    """One pass over the references: a bounded window of them, written in order."""

    def __init__(
        self,
        store: ImageStore,
        known: _Known,
        fetcher: ImageFetcher,
        budget: _Budget,
        manifest: ManifestWriter,
        on_done: Callable[[int, int], None] | None,
        window_size: int,
        refresh: OutputRefresh | None = None,
    ) -> None:
        self.report = SyncReport()
        self._refresh = refresh
        self._fresh_urls: dict[str, asyncio.Task[Sequence[str] | str | None]] = {}
        self._store, self._known, self._fetcher, self._budget = store, known, fetcher, budget
        self._manifest, self._on_done = manifest, on_done
        self._window_size = window_size
        self._window: deque[tuple[ImageRef, str, _Pending]] = deque()
        self._inflight: dict[str, asyncio.Task[_Outcome]] = {}
        self._met = self._settled = 0

    async def run(self, refs: Iterable[ImageRef]) -> None:
        try:
            for ref in refs:
                key = _url_key(ref.url)
                self._window.append((ref, key, self._start(ref, key)))
                await self._drain(keep=self._window_size)
            await self._drain(keep=0)
        finally:
            tasks = [*self._inflight.values(), *self._fresh_urls.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, ref: ImageRef, key: str) -> _Pending:
        running = self._inflight.get(key)
        if running is not None:
            return running
        settled = self._known.settled(key)
        if settled is not None:
            return settled
        self._met += 1
        reused = self._known.reusable(ref, self._store)
        if reused is not None:
            outcome = _Outcome(template=reused)
            self._settle(key, outcome)
            return outcome
        task = asyncio.ensure_future(self._fetch(ref))
        self._inflight[key] = task
        return task

    async def _fetch(self, ref: ImageRef) -> _Outcome:
        """The image of `ref`; an output whose URL is gone is fetched from a fresh URL."""
        outcome = await _download(ref.url, self._fetcher, self._store, self._budget)
        if not outcome.gone or ref.role != "edited" or ref.request_id is None:
            return outcome
        if self._refresh is None:
            return outcome
        fresh = await self._fresh(ref.request_id)
        if isinstance(fresh, str):
            return _Outcome(
                error=f"{outcome.error}; asking the API for a fresh URL failed: {fresh}"
            )
        if fresh is None or ref.index >= len(fresh):
            return _Outcome(error=EXPIRED_ERROR, expired=True)
        again = await _download(fresh[ref.index], self._fetcher, self._store, self._budget)
        return replace(again, error=EXPIRED_ERROR, expired=True) if again.gone else again

    def _fresh(self, request_id: str) -> asyncio.Task[Sequence[str] | str | None]:
        """One `/result` per job however many of its outputs are gone: its fresh URLs, None
        when the API has none, or why asking failed."""
        task = self._fresh_urls.get(request_id)
        if task is None:
            task = asyncio.ensure_future(self._ask(request_id))
            self._fresh_urls[request_id] = task
        return task

    async def _ask(self, request_id: str) -> Sequence[str] | str | None:
        assert self._refresh is not None
        self.report.refreshed += 1
        try:
            return await self._refresh(request_id)
        except Exception as exc:  # a failed ask leaves the image failed, never the step
            detail = " ".join(redact_text(str(exc)).split()) or "no detail"
            return f"{type(exc).__name__}: {detail}"

    async def _drain(self, keep: int) -> None:
        """Write the settled head of the window, and wait for it while more than `keep` wait."""
        while self._window:
            ref, key, pending = self._window[0]
            if isinstance(pending, _Outcome):
                outcome = pending
            elif pending.done() or len(self._window) > keep:
                outcome = await pending
                if self._inflight.pop(key, None) is not None:
                    self._settle(key, outcome)
            else:
                return
            self._window.popleft()
            self._write(_record(ref, outcome))

    def _settle(self, key: str, outcome: _Outcome) -> None:
        self._known.settle(key, outcome)
        if outcome.downloaded and outcome.template is not None:
            self.report.downloaded += 1
            self.report.bytes_downloaded += outcome.template.bytes or 0
        elif outcome.template is not None:
            self.report.reused += 1
        self._settled += 1
        if self._on_done is not None:
            self._on_done(self._settled, self._met)

    def _write(self, record: ImageRecord) -> None:
        self._manifest.write(record)
        report = self.report
        if record.status == EXPIRED:
            report.expired += 1
            if len(report.first_expired) < FAILURES_KEPT:
                report.first_expired.append(record)
            return
        if not record.ok:
            report.failed += 1
            if len(report.first_failures) < FAILURES_KEPT:
                report.first_failures.append(record)
            return
        report.stored += 1
        if record.verified == "header":
            report.not_decoded += 1
        if record.sha256 is not None and self._known.first_sight(record.sha256):
            report.bytes_stored += record.bytes or 0


async def sync_images(
    refs: Iterable[ImageRef],
    store: ImageStore,
    manifest: Path | UPath,
    previous: Path | UPath | None = None,
    *,
    policy: AddressPolicy | None = None,
    limits: FetchLimits | None = None,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    max_decodes: int = DEFAULT_MAX_DECODES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: PixelBudget | None = None,
    on_done: Callable[[int, int], None] | None = None,
    resolver: Resolver = system_resolver,
    transport: httpx.AsyncBaseTransport | None = None,
    refresh: OutputRefresh | None = None,
) -> SyncReport:
    """Store every image of `refs` and write their manifest; failures are `failed` rows.

    `refs` is read once, as it comes (an iterator is fine). The manifest at `manifest`
    gets one record per reference, in reference order, and appears only when complete: on
    an exception the file there stays as it was. `previous` is the last manifest, whose
    stored images are reused; it may be `manifest` itself (it is indexed before the new
    one replaces it).

    `policy` decides which addresses may be fetched (default: public addresses only;
    `AddressPolicy.for_api(base_url)` allows loopback for the emulator). At most
    `max_concurrency` downloads are in flight. Decodes share `budget` (pass one budget to
    share it with other decodes of the process, such as the contact sheet's); above
    `max_pixels` an image is stored undecoded. `on_done(settled, met)` is called after
    each distinct URL settles, with the distinct URLs met so far (the total is known only
    at the end of `refs`). `resolver` and `transport` are the test seams. `refresh` asks
    the API for a job's fresh output URLs when an output's URL is gone (403/404/410);
    without it such an image is `failed`.

    Example::

        report = await sync_images(refs, store, Path("out/m.parquet"), Path("out/m.parquet"))
    """
    known = _Known(previous)
    slots = _Budget(
        asyncio.Semaphore(max_concurrency),
        asyncio.Semaphore(max_decodes),
        max_pixels,
        budget if budget is not None else PixelBudget(max_pixels),
    )
    try:
        async with GuardedFetcher(
            policy,
            limits,
            resolver=resolver,
            transport=transport,
            max_connections=max_concurrency,
        ) as guarded:
            with ManifestWriter(manifest) as writer:
                fetcher = ImageFetcher(guarded)
                window = max(WINDOW_REFS, 4 * max_concurrency)
                sync = _Sync(store, known, fetcher, slots, writer, on_done, window, refresh)
                await sync.run(refs)
                return sync.report
    finally:
        known.close()


def _on_a_fresh_loop(
    run: Callable[_P, Coroutine[Any, Any, SyncReport]],
) -> Callable[_P, SyncReport]:
    @functools.wraps(run)
    def blocking(*args: _P.args, **kwargs: _P.kwargs) -> SyncReport:
        return asyncio.run(run(*args, **kwargs))

    return blocking


sync_images_blocking = _on_a_fresh_loop(sync_images)
"""`sync_images` on a fresh event loop, for synchronous callers (a Dagster step).

Example::

    report = sync_images_blocking(refs, store, manifest_path, previous=manifest_path)
"""
