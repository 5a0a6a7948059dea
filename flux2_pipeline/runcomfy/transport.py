"""The HTTP transport under the client: aiohttp's connection pool behind httpx's API.

httpx's own pool (httpcore) spends milliseconds of CPU per call (encode/httpx#3215);
polling thousands of jobs on two cores, that is most of the run. `default_transport`
therefore returns an `AiohttpTransport` (from `httpx-aiohttp`) when it is installed, and
None (httpx's own transport) otherwise. Callers keep httpx's API: requests, responses,
`httpx.MockTransport` in tests. The figures are in README.md, "Benchmarks".

`httpx-aiohttp` maps aiohttp's errors to httpx's too loosely for a client that bills:
any `aiohttp.ClientConnectionError`, a connection dropped mid-request included, becomes
`httpx.ConnectTimeout`, which means "nothing was sent" and would let a paid submit be
retried. `AiohttpTransport` here maps by what the error says about the request:

===================================  ============================  ==============
aiohttp                              httpx                         request sent?
===================================  ============================  ==============
ClientConnectorError (refused, DNS)  ConnectError                  no
ConnectionTimeoutError (connect,     ConnectTimeout                no
pool wait)
SocketTimeoutError, other timeouts   ReadTimeout                   maybe
ServerDisconnectedError              RemoteProtocolError           maybe
ClientPayloadError (cut-off body)    RemoteProtocolError           yes
ClientResponseError (bad response)   RemoteProtocolError           yes
ClientOSError (reset, broken pipe)   ReadError                     maybe
InvalidURL, NonHttpUrlClientError    UnsupportedProtocol           no
any other ClientError                TransportError                maybe
===================================  ============================  ==============

Proxy variables (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) are read once, when the transport
is made for a base URL, not on every request: aiohttp's `trust_env=True` looks them (and
~/.netrc) up per request, which doubled the client's CPU per job.

Example::

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    http = httpx.AsyncClient(transport=default_transport(limits))
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

try:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport as _AiohttpBase
except ImportError:  # pragma: no cover - httpx-aiohttp is a core dependency
    _AVAILABLE = False
else:
    _AVAILABLE = True

__all__ = [
    "AiohttpTransport",
    "aiohttp_available",
    "default_transport",
    "httpx_error_for",
    "proxy_for",
]

_HTTPX_LOGGER = logging.getLogger("httpx")


def aiohttp_available() -> bool:
    """True when `httpx-aiohttp` (and so aiohttp) can be imported."""
    return _AVAILABLE


def httpx_error_for(exc: BaseException) -> type[httpx.TransportError]:
    """The httpx exception class for an aiohttp (or asyncio timeout) error; see the table."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout
    if isinstance(exc, TimeoutError):  # SocketTimeoutError, ServerTimeoutError, total timeout
        return httpx.ReadTimeout
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError,
    ):
        return httpx.RemoteProtocolError
    if isinstance(exc, aiohttp.ClientOSError):
        return httpx.ReadError
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol
    return httpx.TransportError


def _original(exc: BaseException) -> BaseException:
    # httpx-aiohttp re-raises its own (too loose) mapping `from` the aiohttp error.
    cause = exc.__cause__
    return cause if isinstance(exc, httpx.TransportError) and cause is not None else exc


def _remap(exc: Exception, request: httpx.Request) -> httpx.TransportError | None:
    original = _original(exc)
    if not isinstance(original, aiohttp.ClientError | TimeoutError):
        return None
    message = str(original) or type(original).__name__
    return httpx_error_for(original)(message, request=request)


class AiohttpTransport(_AiohttpBase):
    """httpx-aiohttp's transport with the exception mapping of this module.

    Example::

        transport = AiohttpTransport(limits=httpx.Limits(max_connections=64))
        async with httpx.AsyncClient(transport=transport) as http:
            await http.get("http://127.0.0.1:8188/_emulator/stats")
    """

    _proxy_options: dict[str, Any] | None = None

    @staticmethod
    def timeout_for(timeout: httpx.Timeout) -> aiohttp.ClientTimeout:
        """The aiohttp timeout `handle_async_request` uses for a request with `timeout`."""
        return aiohttp.ClientTimeout(
            sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
        )

    async def fetch(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
        timeout: aiohttp.ClientTimeout,
    ) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes, bool]:
        """One whole exchange without httpx's request and response objects.

        Sends exactly what `handle_async_request` would for an `httpx.Request` with
        these headers and body (no redirects, no decompression, the proxy) and maps
        errors the same way (and logs httpx's INFO line), but reads the body in one go:
        this is the client's hot path, and httpx's per-request objects cost more CPU
        than the HTTP itself.
        Returns the status, the raw headers, the raw body and whether the body has a
        Content-Encoding (which httpx would decode).
        """
        session = self.client
        if not isinstance(session, aiohttp.ClientSession):
            session = self.client = self.get_client()
        options = self._proxy_options
        if options is None:
            options = self._proxy_options = self._proxy_settings()
        try:
            async with session.request(
                method,
                url,
                headers=headers,
                data=content,
                allow_redirects=False,
                auto_decompress=False,
                compress=False,
                timeout=timeout,
                **options,
            ) as response:
                if _HTTPX_LOGGER.isEnabledFor(logging.INFO):  # the line httpx.AsyncClient logs
                    status = response.status
                    reason = response.reason or httpx.codes.get_reason_phrase(status)
                    _HTTPX_LOGGER.info(
                        'HTTP Request: %s %s "%s %d %s"', method, url, "HTTP/1.1", status, reason
                    )
                body = await response.read()
                encoded = "Content-Encoding" in response.headers
                return response.status, response.raw_headers, body, encoded
        except (aiohttp.ClientError, TimeoutError) as exc:
            message = str(exc) or type(exc).__name__
            raise httpx_error_for(exc)(message) from exc

    def _proxy_settings(self) -> dict[str, Any]:
        proxy = self.proxy
        if proxy is None:
            return {"proxy": None, "proxy_auth": None, "proxy_headers": None}
        auth = aiohttp.BasicAuth(proxy.auth[0], proxy.auth[1]) if proxy.auth else None
        return {"proxy": str(proxy.url), "proxy_auth": auth, "proxy_headers": proxy.headers}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response: httpx.Response = await super().handle_async_request(request)
        except Exception as exc:
            mapped = _remap(exc, request)
            if mapped is None:
                raise
            raise mapped from _original(exc)
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        response.stream = _MappedStream(stream, request)
        return response


class _MappedStream(httpx.AsyncByteStream):
    """A response body whose aiohttp errors are mapped like the request's."""

    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._inner = inner
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except Exception as exc:
            mapped = _remap(exc, self._request)
            if mapped is None:
                raise
            raise mapped from _original(exc)

    async def aclose(self) -> None:
        await self._inner.aclose()


def proxy_for(url: str) -> httpx.Proxy | None:
    """The proxy the environment sets for `url` (honouring NO_PROXY), or None.

    >>> proxy_for("http://127.0.0.1:8188") is None
    True
    """
    host = urlsplit(url).hostname or ""
    proxies = urllib.request.getproxies()
    chosen = proxies.get(urlsplit(url).scheme)
    if not chosen or urllib.request.proxy_bypass(host):
        return None
    return httpx.Proxy(chosen)


def default_transport(
    limits: httpx.Limits, base_url: str | None = None
) -> httpx.AsyncBaseTransport | None:
    """An `AiohttpTransport` with these limits, or None (httpx's own) without httpx-aiohttp.

    `base_url` picks the proxy from the environment once (see `proxy_for`).

    Example::

        >>> type(default_transport(httpx.Limits(max_connections=16))).__name__
        'AiohttpTransport'
    """
    if not _AVAILABLE:
        return None
    proxy = proxy_for(base_url) if base_url else None
    # trust_env=False: the proxy was read above, once; aiohttp would re-read it per request.
    transport: httpx.AsyncBaseTransport = AiohttpTransport(
        limits=limits, proxy=proxy, trust_env=False
    )
    return transport
