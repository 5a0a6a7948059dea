"""Download one image over HTTP: retries with backoff, a size cap, a content-type check.

Which failures are retried, and how long to wait, are pure functions with constants the
tests can read. Only transient failures are retried (connection errors, timeouts, 408,
425, 429, 500, 502, 503, 504); a 404 or 410 (an expired URL) fails at once.

Example::

    async with httpx.AsyncClient() as http:
        fetcher = ImageFetcher(http, FetchLimits(max_bytes=8 << 20))
        fetched = await fetcher.fetch("https://example.com/a.png")
        fetched.content_type, len(fetched.data)
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from flux2_pipeline.media.errors import ImageTooLarge, ImageUnavailable, NotAnImage

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
BACKOFF_BASE = 0.25
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 30.0
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FetchLimits:
    """Budgets for fetching one image.

    Example::

        FetchLimits(max_bytes=1 << 20, attempts=2, timeout=10.0)
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    attempts: int = 4
    timeout: float = 30.0
    backoff_base: float = BACKOFF_BASE


@dataclass(frozen=True, slots=True)
class Fetched:
    """The complete body of a successful image response."""

    url: str
    data: bytes
    content_type: str


def is_retryable_status(status: int) -> bool:
    """True for HTTP statuses worth asking again (throttling and server errors)."""
    return status in RETRYABLE_STATUS


def backoff_delay(
    attempt: int, base: float = BACKOFF_BASE, rng: random.Random | None = None
) -> float:
    """Seconds before retry number `attempt` (1-based): exponential with full jitter."""
    ceiling = min(BACKOFF_CAP, base * (2 ** (attempt - 1)))
    return (rng or random).uniform(0, ceiling)


def retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After` header (seconds or an HTTP date) in seconds, capped; None if absent."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (moment - datetime.now(UTC)).total_seconds()
    return max(0.0, min(RETRY_AFTER_CAP, seconds))


class _Transient(Exception):
    def __init__(self, reason: str, wait: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.wait = wait
        self.status = status


class ImageFetcher:
    """Fetches image bytes with `http`; raises an `ImageFetchError` subclass on failure."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        limits: FetchLimits | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.http = http
        self.limits = limits or FetchLimits()
        self._sleep = sleep

    async def fetch(self, url: str) -> Fetched:
        """The image at `url`, after up to `limits.attempts` tries of transient failures."""
        last: _Transient | None = None
        for attempt in range(1, self.limits.attempts + 1):
            try:
                return await self._once(url)
            except _Transient as exc:
                last = exc
            if attempt < self.limits.attempts:
                wait = last.wait
                if wait is None:
                    wait = backoff_delay(attempt, self.limits.backoff_base)
                await self._sleep(wait)
        assert last is not None
        raise ImageUnavailable(
            url, f"{last} (gave up after {self.limits.attempts} attempts)", last.status
        )

    async def _once(self, url: str) -> Fetched:
        cap = self.limits.max_bytes
        try:
            async with self.http.stream("GET", url, timeout=self.limits.timeout) as response:
                status = response.status_code
                if status >= 400:
                    reason = f"HTTP {status} {response.reason_phrase} from {url}"
                    if is_retryable_status(status):
                        wait = retry_after_seconds(response.headers.get("retry-after"))
                        raise _Transient(reason, wait, status)
                    if status in (404, 410):
                        reason += " (the URL has expired or never existed)"
                    raise ImageUnavailable(url, reason, status)
                if status >= 300:
                    raise ImageUnavailable(url, f"HTTP {status}: unfollowed redirect", status)
                content_type = response.headers.get("content-type", "")
                media_type = content_type.split(";", 1)[0].strip().lower()
                if not media_type.startswith("image/"):
                    shown = media_type or "none"
                    raise NotAnImage(url, f"content type {shown!r} is not an image/* type", status)
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cap:
                    raise ImageTooLarge(
                        url, f"{int(declared)} bytes is more than the {cap}-byte cap", status
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise ImageTooLarge(
                            url, f"more than the {cap}-byte cap (stopped reading)", status
                        )
                    chunks.append(chunk)
                return Fetched(url, b"".join(chunks), media_type)
        except (httpx.TransportError, httpx.StreamError) as exc:
            if isinstance(exc, httpx.UnsupportedProtocol):
                raise ImageUnavailable(url, f"unsupported URL: {exc}") from exc
            raise _Transient(f"{type(exc).__name__}: {exc or 'no detail'} for {url}") from exc
