"""The HTTP seam under the client: one small protocol, two implementations.

The client makes every call through `HttpTransport.send(method, url, headers, body,
timeout) -> RawResponse`. The client builds the URL, the headers (once per call shape)
and the JSON bytes itself; a transport only moves bytes.

- `AiohttpTransport` (the default) sends on aiohttp's connection pool, through its
  public API. httpx's own pool (httpcore) spends milliseconds of CPU per call
  (encode/httpx#3215); polling thousands of jobs on two cores, that is most of the run.
  The figures are in benchmarks/README.md.
- `HttpxTransport` adapts any `httpx.AsyncBaseTransport`: `httpx.MockTransport` in tests,
  `httpx.AsyncHTTPTransport(proxy=..., verify=...)` for httpx's pool and its options.
  The client wraps an httpx transport given as `transport=` in it.

Both raise httpx's transport exceptions (public classes), chosen by what the failure
says about the request, because a paid submit may be retried only when nothing was
sent. `AiohttpTransport` maps aiohttp's errors so (`httpx_error_for`):

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

A pooled connection the server has closed is never written to: servers close idle
connections (uvicorn after 5 s, many load balancers sooner), and a request written to such
a connection fails with no sign of whether the server read it, so a submit's outcome
would be unknown. Two guards, both before a byte leaves: the pool keeps an idle connection
`POOL_KEEPALIVE_SECONDS` (below what servers commonly keep, so the client drops it first),
and a reused connection whose socket already has something to read (the server's FIN or
reset, which the event loop may not have handled yet) is closed and another one taken
(`_FreshConnector`). A failure after the request was written stays "maybe sent": the
client cannot tell a request the server dropped unread from one it acted on. httpx's pool
(httpcore) checks an idle socket the same way; give a transport of your own
`httpx.Limits(keepalive_expiry=POOL_KEEPALIVE_SECONDS)` too (httpx's default is 5 s).

Proxy variables (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) are read once, when the default
transport is made for a base URL (`proxy_for`), not on every request: aiohttp's
`trust_env=True` looks them (and ~/.netrc) up per request, which doubled the client's
CPU per job.

Example::

    transport = default_transport(max_connections=64, base_url="http://127.0.0.1:8188")
    answer = await transport.send("GET", url, {"Accept": "application/json"}, None,
                                  httpx.Timeout(10.0))
    print(answer.status_code, answer.content)
    await transport.aclose()
"""

from __future__ import annotations

import select
import urllib.request
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
import httpx
from yarl import URL

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

__all__ = [
    "POOL_KEEPALIVE_SECONDS",
    "AiohttpTransport",
    "HttpTransport",
    "HttpxTransport",
    "RawResponse",
    "default_transport",
    "httpx_error_for",
    "proxy_for",
]

POOL_KEEPALIVE_SECONDS = 4.0
"""How long the aiohttp pool keeps an idle connection for reuse: less than servers commonly
keep one open (uvicorn 5 s, nginx 75 s, cloud load balancers 5 to 60 s), so the client
drops it before the server closes it under a request. aiohttp's own default is 15 s."""


@dataclass(frozen=True, slots=True)
class RawResponse:
    """One HTTP answer: status, headers (a case-insensitive mapping) and the decoded body.

    Example::

        >>> RawResponse(200, httpx.Headers({"Retry-After": "1"}), b"{}").headers["retry-after"]
        '1'
    """

    status_code: int
    headers: Mapping[str, str]
    content: bytes


@runtime_checkable
class HttpTransport(Protocol):
    """What the client needs from HTTP: send one request, read the whole answer, close.

    `send` raises `httpx.TransportError` subclasses on failure: `httpx.ConnectError`,
    `httpx.ConnectTimeout`, `httpx.PoolTimeout` and `httpx.UnsupportedProtocol` only
    when no byte of the request left this process.
    """

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: httpx.Timeout,
    ) -> RawResponse:
        """Send one request and return its whole answer (redirects are not followed)."""
        ...

    async def aclose(self) -> None:
        """Close the connection pool."""
        ...


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


def _has_input(transport: object) -> bool:
    """True if an idle connection's socket is readable: the server closed or reset it, or
    sent what no request asked for. Either way the connection must not carry a request."""
    get_extra_info = getattr(transport, "get_extra_info", None)
    sock = get_extra_info("socket") if get_extra_info is not None else None
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return True
    if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))  # POLLHUP and POLLERR are reported unasked
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


class _FreshConnector(aiohttp.TCPConnector):
    """A `TCPConnector` that never hands out a pooled connection the server has closed.

    aiohttp checks `is_connected()`, which only knows what the event loop has processed:
    a FIN that arrived while the loop was busy still looks connected. Checking the socket
    itself before the request is written proves the request was not sent on it, so taking
    another connection is safe even for a paid POST. New connections are not checked: a
    TLS server may send session tickets right after the handshake.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[object] = weakref.WeakSet()
        self.stale_discarded = 0
        """Pooled connections found closed by the server and dropped unused."""

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        # Each stale connection is closed, so the pool shrinks on every pass; the bound
        # only guards against a server that closes every new connection at once.
        for _ in range(self.limit + 1):
            conn = await super().connect(req, traces, timeout)
            protocol = conn.protocol
            reused = protocol is not None and protocol in self._handed_out
            if not (reused and _has_input(conn.transport)):
                if protocol is not None:
                    self._handed_out.add(protocol)
                return conn
            self.stale_discarded += 1
            conn.close()
        return conn


class AiohttpTransport:
    """`HttpTransport` on aiohttp's connection pool (the client's default).

    Args:
        max_connections: connections kept open at most (all of them reused).
        proxy: an HTTP proxy URL (credentials in it are sent as proxy auth), or None.

    The aiohttp session is made on the first request, in the running event loop.

    Example::

        transport = AiohttpTransport(max_connections=64)
        client = AsyncRunComfyClient(token, base_url, transport=transport)
    """

    def __init__(self, *, max_connections: int = 100, proxy: str | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self._proxy: URL | None = None
        self._proxy_headers: dict[str, str] | None = None
        if proxy:
            parsed = URL(proxy)
            auth = aiohttp.BasicAuth.from_url(parsed)
            if auth is not None:
                self._proxy_headers = {"Proxy-Authorization": auth.encode()}
            self._proxy = parsed.with_user(None)
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: tuple[httpx.Timeout, aiohttp.ClientTimeout] | None = None

    def __repr__(self) -> str:
        return f"AiohttpTransport(max_connections={self.max_connections})"

    def _open(self) -> aiohttp.ClientSession:
        connector = _FreshConnector(
            limit=self.max_connections,
            limit_per_host=0,
            keepalive_timeout=POOL_KEEPALIVE_SECONDS,
            enable_cleanup_closed=True,
        )
        # trust_env=False: the proxy was read once (see `proxy_for`); a dummy cookie jar
        # because the API sets no cookies and the default jar costs CPU on every answer;
        # no automatic Content-Type, so a POST without a body carries none (as with httpx).
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Content-Type",),
        )
        return self._session

    def _timeout_for(self, timeout: httpx.Timeout) -> aiohttp.ClientTimeout:
        cached = self._timeouts
        if cached is not None and cached[0] is timeout:
            return cached[1]
        # aiohttp's `connect` covers the wait for a pooled connection and the connect.
        converted = aiohttp.ClientTimeout(
            total=None, connect=timeout.pool, sock_connect=timeout.connect, sock_read=timeout.read
        )
        self._timeouts = (timeout, converted)
        return converted

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: httpx.Timeout,
    ) -> RawResponse:
        """Send one request on the pool; aiohttp's errors become httpx's (see the table)."""
        session = self._session or self._open()
        if self._proxy_headers is not None and url.startswith("http:"):
            # No tunnel for plain HTTP: the proxy reads its credentials from the request
            # (aiohttp puts them only on the CONNECT of an HTTPS tunnel).
            headers = {**headers, **self._proxy_headers}
        try:
            async with session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self._timeout_for(timeout),
                proxy=self._proxy,
                proxy_headers=self._proxy_headers,
            ) as response:
                content = await response.read()
                return RawResponse(response.status, response.headers, content)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise httpx_error_for(exc)(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        """Close the pool (a later request opens a new one)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class HttpxTransport:
    """`HttpTransport` over any `httpx.AsyncBaseTransport`, e.g. `httpx.MockTransport`.

    Example::

        transport = HttpxTransport(httpx.MockTransport(lambda request: httpx.Response(204)))
        answer = await transport.send("GET", "https://api.test/x", {}, None, httpx.Timeout(5))
        assert answer.status_code == 204
    """

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    def __repr__(self) -> str:
        return f"HttpxTransport({type(self.transport).__name__})"

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: httpx.Timeout,
    ) -> RawResponse:
        """Send through the wrapped transport and read (and decode) the whole body."""
        request = httpx.Request(
            method, url, headers=headers, content=body, extensions={"timeout": timeout.as_dict()}
        )
        response = await self.transport.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return RawResponse(response.status_code, response.headers, content)

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()


def proxy_for(url: str) -> str | None:
    """The proxy URL the environment sets for `url` (honouring NO_PROXY), or None.

    >>> proxy_for("http://127.0.0.1:8188") is None
    True
    """
    parts = urlsplit(url)
    chosen = urllib.request.getproxies().get(parts.scheme)
    if not chosen or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return chosen


def default_transport(max_connections: int, base_url: str | None = None) -> AiohttpTransport:
    """The client's default: an `AiohttpTransport` with the environment's proxy for `base_url`.

    Example::

        >>> default_transport(16, "http://127.0.0.1:8188")
        AiohttpTransport(max_connections=16)
    """
    return AiohttpTransport(
        max_connections=max_connections, proxy=proxy_for(base_url) if base_url else None
    )
