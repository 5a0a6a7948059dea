"""Download one image: http(s) through the guarded fetcher, s3:// through fsspec.

Every http(s) image goes through `flux2_pipeline.net.GuardedFetcher`: the address policy
on the resolved IP (link-local always refused; loopback and private ranges only when
allowed), redirects re-checked, a total deadline per attempt, a size cap, and retries of
transient failures with `flux2_pipeline.runcomfy.retry`'s policy. `s3://` reference images
are read through `flux2_pipeline.paths.read_object` under the same size cap. Failures
become `ImageFetchError` subclasses with a one-line, redacted reason.

Example::

    async with GuardedFetcher(AddressPolicy.for_api(base_url), FetchLimits()) as guarded:
        fetcher = ImageFetcher(guarded)
        fetched = await fetcher.fetch("https://example.com/a.png")
        fetched.content_type, len(fetched.data)
"""

from __future__ import annotations

import asyncio
import mimetypes
from dataclasses import dataclass

from flux2_pipeline.media.errors import (
    ImageFetchError,
    ImageRefused,
    ImageTooLarge,
    ImageUnavailable,
    InvalidImageUrl,
    NotAnImage,
)
from flux2_pipeline.net import FetchError, GuardedFetcher
from flux2_pipeline.paths import ObjectTooLarge, is_readable_object_uri, read_object

_ERRORS: dict[str, type[ImageFetchError]] = {
    "invalid_url": InvalidImageUrl,
    "refused": ImageRefused,
    "too_large": ImageTooLarge,
    "unavailable": ImageUnavailable,
}


@dataclass(frozen=True, slots=True)
class FetchedImage:
    """The complete bytes of one image and its media type."""

    url: str
    data: bytes
    content_type: str


class ImageFetcher:
    """Fetches image bytes; raises an `ImageFetchError` subclass on any failure."""

    def __init__(self, guarded: GuardedFetcher) -> None:
        self.guarded = guarded

    async def fetch(self, url: str) -> FetchedImage:
        """The image at `url` (http, https or s3)."""
        if isinstance(url, str) and is_readable_object_uri(url):
            return await self._read_object(url)
        try:
            fetched = await self.guarded.fetch(url)
        except FetchError as exc:
            raise _ERRORS.get(exc.kind, ImageUnavailable)(url, exc.reason, exc.status) from None
        if not fetched.content_type.startswith("image/"):
            shown = fetched.content_type or "none"
            raise NotAnImage(url, f"content type {shown!r} is not an image/* type", fetched.status)
        return FetchedImage(url, fetched.data, fetched.content_type)

    async def _read_object(self, url: str) -> FetchedImage:
        cap = self.guarded.limits.max_bytes
        try:
            data = await asyncio.to_thread(read_object, url, cap)
        except ObjectTooLarge as exc:
            raise ImageTooLarge(url, f"{exc} ({url})") from None
        except FileNotFoundError:
            raise ImageUnavailable(url, f"no such object: {url}") from None
        except Exception as exc:  # the object store's client raises many types
            detail = " ".join(str(exc).split()) or "no detail"
            raise ImageUnavailable(
                url, f"cannot read {url}: {type(exc).__name__}: {detail}"
            ) from None
        guessed = mimetypes.guess_type(url.split("?", 1)[0])[0]
        return FetchedImage(url, data, guessed or "application/octet-stream")
