"""The one guarded door for URLs that came from a table or an API answer.

`GuardedFetcher` fetches an untrusted http(s) URL under one address policy, one deadline
and one size cap:

- the host is resolved once per hop, the address checked by `AddressPolicy`, and the
  connection made to *that* IP (the Host header and TLS server name keep the host name),
  so DNS rebinding between check and connect cannot slip through;
- redirects are followed by hand, at most `max_redirects`, each hop parsed and checked
  again;
- each attempt (resolution, every hop and the whole body) has a total deadline, so a
  server sending one byte a second cannot hold a download past `timeout`;
- the body is capped at `max_bytes` (by Content-Length, then while reading);
- no credentials, cookies, proxies or .netrc entries are ever sent;
- every problem with one URL (malformed, refused, too large, unavailable) is a
  `FetchError` with a one-line reason naming the redacted URL, never another exception.

Retries use `flux2_pipeline.runcomfy.retry`'s pure functions: transient failures
(connection errors, timeouts, 408/429/5xx) are tried again with backoff or Retry-After.

Example::

    async with GuardedFetcher(AddressPolicy.for_api(base_url)) as fetcher:
        fetched = await fetcher.fetch("https://cdn.example.com/cat.png")
        fetched.content_type, len(fetched.data)          # "image/png", 48213

        # The batch runner checks each distinct reference once before paying for a row:
        result = await fetcher.probe("https://cdn.example.com/cat.png")
        if not result.ok:
            print(result.reason)   # "HTTP 404 Not Found from https://cdn.example.com/cat.png"
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from flux2_pipeline.net.errors import FetchError, one_line, shown_url
from flux2_pipeline.net.policy import AddressPolicy, AddressRefused, Resolver, system_resolver
from flux2_pipeline.runcomfy.retry import RetryPolicy, is_retryable_status, parse_retry_after

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
SCHEMES = frozenset({"http", "https"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
HEAD_REFUSED_STATUSES = frozenset({403, 405, 501})
"""HEAD answers that mean "ask with GET instead" (403: a URL signed for GET only)."""
USER_AGENT = "flux2-pipeline"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class FetchLimits:
    """Budgets for one untrusted URL.

    `timeout` is the total time of one attempt: resolution, every redirect and the whole
    body. `probe_timeout` is the same for one `probe` attempt.

    Example::

        FetchLimits(max_bytes=1 << 20, attempts=2, timeout=10.0)
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    attempts: int = 4
    timeout: float = 30.0
    backoff_base: float = 0.25
    max_redirects: int = 5
    probe_timeout: float = 5.0
    probe_attempts: int = 2

    def retry_policy(self, attempts: int) -> RetryPolicy:
        """The retry policy for `attempts` tries with this backoff."""
        return RetryPolicy(
            max_attempts=attempts, base_delay=self.backoff_base, max_delay=8.0, max_retry_after=30.0
        )


@dataclass(frozen=True, slots=True)
class Fetched:
    """The complete body of a successful answer.

    `url` is the URL asked for, `final_url` the one that answered (after redirects),
    `content_type` the media type, lowercased, without parameters.
    """

    url: str
    data: bytes
    content_type: str
    status: int
    final_url: str


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Whether a URL answered: `ok`, or `reason` (one redacted line naming the URL).

    `url` is the probed URL, redacted; `status` the last HTTP status seen, if any.
    """

    url: str
    ok: bool
    reason: str | None = None
    status: int | None = None


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(reason)
        self.retry_after = retry_after
        self.status = status


def parse_url(url: object) -> httpx.URL:
    """`url` as an `httpx.URL` if it is a fetchable http(s) URL; else `FetchError`.

    >>> str(parse_url("https://example.com/a.png"))
    'https://example.com/a.png'
    >>> parse_url("http://[::1/a.png")
    Traceback (most recent call last):
    ...
    flux2_pipeline.net.errors.FetchError: malformed URL 'http://[::1/a.png': Invalid IPv6 URL
    """
    if not isinstance(url, str):
        raise FetchError("invalid_url", url, f"not a URL: {shown_url(url)}")
    shown = shown_url(url)
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise FetchError(
            "invalid_url",
            url,
            f"malformed URL {shown!r}: contains whitespace or control characters",
        )
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError as exc:
        raise FetchError("invalid_url", url, f"malformed URL {shown!r}: {exc}") from None
    scheme = split.scheme.lower()
    if scheme not in SCHEMES:
        shown_scheme = scheme or "none"
        raise FetchError(
            "invalid_url", url, f"unsupported URL scheme {shown_scheme!r} in {shown!r}"
        )
    if split.username is not None or split.password is not None:
        raise FetchError("invalid_url", url, f"credentials in the URL are not sent: {shown!r}")
    if port is not None and not 0 < port < 65536:
        raise FetchError("invalid_url", url, f"malformed URL {shown!r}: port {port} out of range")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise FetchError("invalid_url", url, f"malformed URL {shown!r}: {exc}") from None
    if not parsed.host:
        raise FetchError("invalid_url", url, f"malformed URL {shown!r}: no host")
    return parsed


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _closed_cookie_jar() -> http.cookiejar.CookieJar:
    # An empty allow-list refuses every domain: a response's Set-Cookie is never kept,
    # so nothing one URL's server sets is sent to another.
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


class GuardedFetcher:
    """Fetches untrusted http(s) URLs under an `AddressPolicy`, a deadline and a size cap.

    `transport` is the test seam (`httpx.MockTransport`); `resolver` maps a host name to
    IP addresses (tests stub it). Use as an async context manager, or call `aclose`.
    """

    def __init__(
        self,
        policy: AddressPolicy | None = None,
        limits: FetchLimits | None = None,
        *,
        resolver: Resolver = system_resolver,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 16,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.policy = policy or AddressPolicy()
        self.limits = limits or FetchLimits()
        self._resolver = resolver
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            cookies=_closed_cookie_jar(),
            timeout=httpx.Timeout(self.limits.timeout),
            limits=httpx.Limits(max_connections=max_connections),
            headers={"user-agent": USER_AGENT},
        )

    async def __aenter__(self) -> GuardedFetcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def fetch(self, url: str) -> Fetched:
        """The whole body at `url`, retrying transient failures; raises `FetchError`.

        Example::

            fetched = await fetcher.fetch("https://cdn.example.com/cat.png")
        """
        attempts = max(1, self.limits.attempts)
        return await self._with_retries(
            url, attempts, self.limits.timeout, lambda target: self._fetch_once(url, target)
        )

    async def probe(self, url: str) -> ProbeResult:
        """Whether `url` answers, cheaply: HEAD, or a one-byte ranged GET when HEAD is refused.

        Never raises for a bad URL: the result carries `ok` and a one-line `reason`.

        Example::

            result = await fetcher.probe("https://cdn.example.com/cat.png")
            result.ok, result.reason      # False, "HTTP 404 Not Found from https://cdn..."
        """
        attempts = max(1, self.limits.probe_attempts)
        try:
            status = await self._with_retries(
                url,
                attempts,
                self.limits.probe_timeout,
                lambda target: self._probe_once(url, target),
            )
        except FetchError as exc:
            return ProbeResult(shown_url(url), ok=False, reason=str(exc), status=exc.status)
        return ProbeResult(shown_url(url), ok=True, status=status)

    async def _with_retries(
        self,
        url: str,
        attempts: int,
        deadline: float,
        once: Callable[[httpx.URL], Awaitable[_T]],
    ) -> _T:
        try:
            target = parse_url(url)
        except FetchError:
            raise
        except Exception as exc:  # parse_url's guard: never let a URL crash the caller
            raise FetchError("invalid_url", url, f"malformed URL: {type(exc).__name__}") from None
        policy = self.limits.retry_policy(attempts)
        last: _Transient | None = None
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(deadline):
                    return await once(target)
            except _Transient as exc:
                last = exc
            except TimeoutError:
                last = _Transient(f"no complete answer within {deadline:g} s from {shown_url(url)}")
            except FetchError:
                raise
            except (httpx.TransportError, httpx.StreamError) as exc:
                detail = one_line(str(exc)) or "no detail"
                last = _Transient(f"{type(exc).__name__}: {detail} for {shown_url(url)}")
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as exc:
                raise FetchError(
                    "unavailable",
                    url,
                    f"{type(exc).__name__}: {exc or 'no detail'} for {shown_url(url)}",
                ) from None
            if policy.allows_another(attempt):
                await self._sleep(policy.delay(attempt - 1, last.retry_after))
        assert last is not None
        raise FetchError(
            "unavailable", url, f"{last} (gave up after {_attempts(attempts)})", last.status
        )

    async def _fetch_once(self, url: str, target: httpx.URL) -> Fetched:
        cap = self.limits.max_bytes
        async with self._open("GET", url, target, {}) as (response, final):
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise FetchError(
                    "too_large",
                    url,
                    f"{int(declared)} bytes is more than the {cap}-byte cap ({shown_url(url)})",
                    response.status_code,
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise FetchError(
                        "too_large",
                        url,
                        f"more than the {cap}-byte cap (stopped reading {shown_url(url)})",
                        response.status_code,
                    )
                chunks.append(chunk)
            content_type = response.headers.get("content-type", "")
            media_type = content_type.split(";", 1)[0].strip().lower()
            return Fetched(url, b"".join(chunks), media_type, response.status_code, str(final))

    async def _probe_once(self, url: str, target: httpx.URL) -> int:
        async with self._open("HEAD", url, target, {}, accept=HEAD_REFUSED_STATUSES) as (
            response,
            _,
        ):
            status = response.status_code
        if status not in HEAD_REFUSED_STATUSES:
            return status
        async with self._open("GET", url, target, {"range": "bytes=0-0"}, accept={416}) as (
            response,
            _,
        ):
            # A server that ignores Range sends the whole body: read no more than a chunk.
            async for _chunk in response.aiter_bytes():
                break
            return response.status_code

    @asynccontextmanager
    async def _open(
        self,
        method: str,
        url: str,
        target: httpx.URL,
        headers: dict[str, str],
        accept: frozenset[int] | set[int] = frozenset(),
    ) -> AsyncIterator[tuple[httpx.Response, httpx.URL]]:
        """The open answer to `method target` after redirects, as `(response, final URL)`.

        Error statuses (except those in `accept`) raise `FetchError` or `_Transient`.
        """
        current = target
        for hop in range(self.limits.max_redirects + 1):
            response = await self._send_pinned(method, url, current, headers)
            try:
                status = response.status_code
                if status in REDIRECT_STATUSES and "location" in response.headers:
                    if hop == self.limits.max_redirects:
                        raise FetchError(
                            "unavailable",
                            url,
                            f"more than {self.limits.max_redirects} redirects "
                            f"from {shown_url(url)}",
                            status,
                        )
                    current = self._redirect_target(url, current, response.headers["location"])
                    if status == 303 and method != "HEAD":
                        method = "GET"
                    continue
                if status >= 300 and status not in accept:
                    self._raise_for_status(url, response)
                yield response, current
                return
            finally:
                await response.aclose()
        raise AssertionError("unreachable: the loop returns or raises")

    def _redirect_target(self, url: str, current: httpx.URL, location: str) -> httpx.URL:
        try:
            joined = str(current.join(location))
        except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
            raise FetchError(
                "invalid_url", url, f"bad redirect from {shown_url(url)}: {exc}"
            ) from None
        try:
            return parse_url(joined)
        except FetchError as exc:
            raise FetchError(
                exc.kind, url, f"redirect from {shown_url(url)} refused: {exc.reason}"
            ) from None

    def _raise_for_status(self, url: str, response: httpx.Response) -> None:
        status = response.status_code
        reason = f"HTTP {status} {response.reason_phrase} from {shown_url(url)}".replace("  ", " ")
        if status < 400:
            raise FetchError("unavailable", url, f"{reason}: a redirect without a Location", status)
        if is_retryable_status(status):
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise _Transient(reason, retry_after, status)
        if status in (404, 410):
            reason += " (the URL has expired or never existed)"
        raise FetchError("unavailable", url, reason, status)

    async def _send_pinned(
        self, method: str, url: str, target: httpx.URL, headers: dict[str, str]
    ) -> httpx.Response:
        """Resolve, check, then connect to the approved IP, never to a second lookup."""
        host = target.host
        port = _port(target)
        shown = shown_url(url)
        if str(target) != url:
            shown = f"{shown_url(str(target))} (redirected from {shown})"
        if _is_ip_literal(host):
            address = host
            reason = self.policy.refusal(address)
            if reason is not None:
                raise FetchError("refused", url, f"{reason} for {shown}")
        else:
            try:
                addresses = await self._resolver(host, port)
            except OSError as exc:
                raise _Transient(
                    f"cannot resolve {host!r} for {shown}: {one_line(str(exc))}"
                ) from None
            try:
                address = self.policy.choose(list(addresses))
            except AddressRefused as exc:
                raise FetchError("refused", url, f"{exc} for {shown}") from None
        extensions: dict[str, object] = {}
        headers = {**headers, "host": target.netloc.decode("ascii")}
        if target.scheme == "https" and not _is_ip_literal(host):
            extensions["sni_hostname"] = host
            # The pool keys connections by IP: a TLS connection verified for one host name
            # must not be reused for another name on the same address.
            headers["connection"] = "close"
        request = self._http.build_request(
            method, target.copy_with(host=address), headers=headers, extensions=extensions
        )
        try:
            return await self._http.send(request, stream=True)
        except (httpx.TransportError, httpx.StreamError) as exc:
            detail = one_line(str(exc)) or "no detail"
            reason = f"{type(exc).__name__}: {detail} for {shown}"
            if _caused_by(exc, ssl.SSLCertVerificationError):
                raise FetchError("unavailable", url, reason) from None  # asking again won't help
            raise _Transient(reason) from None
