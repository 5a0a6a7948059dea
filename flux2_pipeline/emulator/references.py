"""Reference images for emulated jobs: bounded downloads and a merging async cache.

>>> async with new_http_client() as client:
...     data = await download_reference(client, "https://example.test/cat.png")
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import httpx

from flux2_pipeline.emulator.render import ReferenceImageError, check_reference

REFERENCE_MAX_BYTES = 10 * 1024 * 1024
REFERENCE_TIMEOUT_S = 10.0

_K = TypeVar("_K", bound=Hashable)


class ReferenceFetchError(Exception):
    """A reference image could not be used; the message names the URL and the reason."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not use reference image {url}: {reason}")
        self.url = url
        self.reason = reason


class AsyncMemo(Generic[_K]):
    """A byte-bounded LRU of computed bytes that merges concurrent misses of a key.

    Example::

        >>> memo: AsyncMemo[str] = AsyncMemo(max_bytes=1 << 20, max_items=100)
        >>> await memo.get("k", make_bytes)  # make_bytes runs once, even for racing callers
    """

    def __init__(self, max_bytes: int, max_items: int) -> None:
        self._items: OrderedDict[_K, bytes] = OrderedDict()
        self._pending: dict[_K, asyncio.Future[bytes]] = {}
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_items = max_items

    async def get(self, key: _K, make: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached bytes for `key`, computing them with `make` on a miss."""
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
            return data
        pending = self._pending.get(key)
        if pending is not None:
            # shield: one impatient waiter must not cancel the shared computation.
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            data = await make()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marks it retrieved: there may be no other waiter
            raise
        finally:
            del self._pending[key]
        future.set_result(data)
        self._put(key, data)
        return data

    def _put(self, key: _K, data: bytes) -> None:
        self._items[key] = data
        self._bytes += len(data)
        while self._items and (self._bytes > self._max_bytes or len(self._items) > self._max_items):
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)


def new_http_client() -> httpx.AsyncClient:
    """The client jobs fetch references with (10 s budget, redirects followed).

    Example::

        >>> client = new_http_client()
    """
    return httpx.AsyncClient(
        timeout=REFERENCE_TIMEOUT_S,
        follow_redirects=True,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        # Loopback fixtures must never be sent through an environment proxy.
        mounts={"all://127.0.0.1": None, "all://localhost": None},
    )


async def download_reference(client: httpx.AsyncClient, url: str) -> bytes:
    """GET an http(s) image of at most 10 MiB within 10 s, checked to decode.

    Raises `ReferenceFetchError` naming the URL and the reason otherwise.

    Example::

        >>> data = await download_reference(client, "https://example.test/cat.png")
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise ReferenceFetchError(url, "only http and https URLs can be fetched")
    chunks: list[bytes] = []
    try:
        async with (
            asyncio.timeout(REFERENCE_TIMEOUT_S),
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise ReferenceFetchError(url, f"the server answered HTTP {response.status_code}")
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > REFERENCE_MAX_BYTES:
                    raise ReferenceFetchError(url, "the image is larger than 10 MiB")
                chunks.append(chunk)
    except (TimeoutError, httpx.TimeoutException):
        raise ReferenceFetchError(url, f"timed out after {REFERENCE_TIMEOUT_S:g} s") from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise ReferenceFetchError(url, f"unreachable ({reason})") from None
    data = b"".join(chunks)
    try:
        # Large images take a while to verify; keep the event loop responsive.
        if len(data) > 256 * 1024:
            await asyncio.to_thread(check_reference, data)
        else:
            check_reference(data)
    except ReferenceImageError as exc:
        raise ReferenceFetchError(url, str(exc)) from None
    return data
