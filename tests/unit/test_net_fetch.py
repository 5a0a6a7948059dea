"""GuardedFetcher against `httpx.MockTransport` and a stubbed resolver: no packet leaves."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence

import httpx
import pytest

from flux2_pipeline.net import AddressPolicy, FetchError, FetchLimits, GuardedFetcher

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100
SIGNED = "https://img.test/cat.png?X-Amz-Credential=AKIASECRETID&X-Amz-Signature=deadbeefSECRET"


class Resolver:
    """Maps test host names to addresses and records every lookup."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise OSError(f"no such host {host}")
        return self.table[host]


LOOPBACK_ONLY = AddressPolicy(allow_loopback=True)
HOSTS = {"img.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"], "lan.test": ["10.0.0.7"]}


def fetcher(
    handler: Callable[[httpx.Request], httpx.Response],
    policy: AddressPolicy = LOOPBACK_ONLY,
    resolver: Resolver | None = None,
    sleeps: list[float] | None = None,
    **limits: float,
) -> GuardedFetcher:
    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return GuardedFetcher(
        policy,
        FetchLimits(backoff_base=0.0, **limits),  # type: ignore[arg-type]
        resolver=resolver or Resolver(HOSTS),
        transport=httpx.MockTransport(handler),
        sleep=sleep,
    )


def image(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=PNG, headers={"content-type": "image/png; q=1"})


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request may leave: {request.url}")


async def test_the_connection_goes_to_the_approved_ip_with_the_host_name_kept() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return image(request)

    async with fetcher(handler) as guarded:
        fetched = await guarded.fetch("https://img.test:8443/a.png")
    assert (fetched.data, fetched.content_type, fetched.status) == (PNG, "image/png", 200)
    (request,) = seen
    assert request.url.host == "127.0.0.1" and request.url.port == 8443
    assert request.headers["host"] == "img.test:8443"
    assert request.extensions["sni_hostname"] == "img.test"
    assert request.headers["connection"] == "close"  # never reused for another host name
    assert "authorization" not in request.headers and "cookie" not in request.headers


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://meta.test/latest/meta-data/", "link-local address 169.254.169.254"),
        ("http://169.254.169.254/latest/meta-data/", "link-local address 169.254.169.254"),
        ("http://[fe80::1]/x.png", "link-local address fe80::1"),
        ("http://[::ffff:169.254.169.254]/x.png", "link-local address 169.254.169.254"),
        ("http://lan.test/x.png", "private address 10.0.0.7"),
        ("http://0.0.0.0:8080/x.png", "unspecified address 0.0.0.0"),
    ],
)
async def test_forbidden_addresses_are_refused_before_connecting(url: str, expected: str) -> None:
    async with fetcher(never) as guarded:
        with pytest.raises(FetchError, match=re.escape(expected)) as caught:
            await guarded.fetch(url)
        assert caught.value.kind == "refused"
        probe = await guarded.probe(url)
    assert not probe.ok and probe.reason is not None and expected in probe.reason


async def test_loopback_is_refused_when_the_api_is_remote() -> None:
    policy = AddressPolicy.for_api("https://api.runcomfy.net")
    async with fetcher(never, policy=policy) as guarded:
        with pytest.raises(FetchError, match=re.escape("loopback address 127.0.0.1")):
            await guarded.fetch("http://img.test/a.png")
        with pytest.raises(FetchError, match=re.escape("loopback address 127.0.0.1")):
            await guarded.fetch("http://127.0.0.1:9/a.png")


async def test_every_redirect_hop_is_checked_again() -> None:
    hops: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hops.append(request.url.path)
        if request.url.path == "/start.png":
            return httpx.Response(302, headers={"location": "/middle.png"})
        if request.url.path == "/middle.png":
            return httpx.Response(307, headers={"location": "http://meta.test/creds"})
        raise AssertionError("the redirect to a link-local host must not be followed")

    async with fetcher(handler) as guarded:
        with pytest.raises(FetchError) as caught:
            await guarded.fetch("http://img.test/start.png")
    assert hops == ["/start.png", "/middle.png"]
    assert caught.value.kind == "refused"
    assert str(caught.value) == (
        "link-local address 169.254.169.254 for http://meta.test/creds "
        "(redirected from http://img.test/start.png)"
    )


async def test_redirects_are_followed_up_to_the_limit_and_to_http_only() -> None:
    def loop(request: httpx.Request) -> httpx.Response:
        step = int(request.url.path.strip("/") or 0)
        return httpx.Response(301, headers={"location": f"/{step + 1}"})

    async with fetcher(loop, max_redirects=3) as guarded:
        with pytest.raises(
            FetchError, match=re.escape("more than 3 redirects from http://img.test/0")
        ):
            await guarded.fetch("http://img.test/0")

    def to_file(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": "file:///etc/passwd"})

    async with fetcher(to_file) as guarded:
        with pytest.raises(FetchError, match=re.escape("unsupported URL scheme 'file'")) as caught:
            await guarded.fetch("http://img.test/a.png")
    assert caught.value.kind == "invalid_url"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://☃.test/x.png", "malformed URL"),
        ("http://[::1/a.png", "Invalid IPv6 URL"),
        ("http://img.test/a\x00.png", "control characters"),
        ("http://img.test:99999/a.png", "malformed URL"),
        ("http://img.test:0/a.png", "port 0 out of range"),
        ("ftp://img.test/a.png", "unsupported URL scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("/just/a/path.png", "unsupported URL scheme 'none'"),
        ("", "unsupported URL scheme 'none'"),
        ("http:///a.png", "no host"),
        ("http://user:pw@img.test/a.png", "credentials in the URL are not sent"),
    ],
)
async def test_malformed_urls_are_one_error_each_never_a_crash(url: str, expected: str) -> None:
    async with fetcher(never) as guarded:
        with pytest.raises(FetchError, match=re.escape(expected)) as caught:
            await guarded.fetch(url)
        probe = await guarded.probe(url)
    assert caught.value.kind == "invalid_url"
    assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)
    assert "pw@" not in str(caught.value)
    assert not probe.ok and probe.reason == str(caught.value)


async def test_the_byte_cap_holds_with_and_without_a_content_length() -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    def chunked(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/declared.png":
            return httpx.Response(200, content=b"z" * 5000)
        return httpx.Response(200, content=body())

    async with fetcher(chunked, max_bytes=4000) as guarded:
        with pytest.raises(
            FetchError, match=re.escape("5000 bytes is more than the 4000-byte cap")
        ):
            await guarded.fetch("http://img.test/declared.png")
        with pytest.raises(FetchError, match=re.escape("more than the 4000-byte cap")) as caught:
            await guarded.fetch("http://img.test/stream.png")
    assert caught.value.kind == "too_large"


async def test_cookies_set_by_one_answer_are_never_sent_again() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=PNG, headers={"set-cookie": "session=abc; Path=/"})

    async with fetcher(handler) as guarded:
        await guarded.fetch("http://img.test/a.png")
        await guarded.fetch("http://img.test/b.png")
    assert [r.headers.get("cookie") for r in seen] == [None, None]


async def test_transient_failures_retry_with_the_shared_policy_and_retry_after() -> None:
    answers = iter([httpx.Response(503, headers={"retry-after": "2"}), httpx.Response(429)])
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or image(request)

    async with fetcher(handler, sleeps=sleeps, attempts=3) as guarded:
        fetched = await guarded.fetch("http://img.test/a.png")
    assert fetched.data == PNG
    assert 2.0 <= sleeps[0] <= 2.2 and sleeps[1] == 0.0


async def test_errors_name_the_url_without_its_signature() -> None:
    def forbidden(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403)

    async with fetcher(forbidden, attempts=1) as guarded:
        with pytest.raises(FetchError) as caught:
            await guarded.fetch(SIGNED)
        probe = await guarded.probe(SIGNED)
    text = f"{caught.value} {caught.value!r} {caught.value.url} {probe}"
    assert "SECRET" not in text
    assert str(caught.value).startswith("HTTP 403 Forbidden from https://img.test/cat.png?")
    assert "X-Amz-Signature=REDACTED" in str(caught.value)


async def test_probe_asks_head_then_a_one_byte_range_when_head_is_refused() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.headers.get("range")))
        if request.url.path == "/gone.png":
            return httpx.Response(404)
        if request.method == "HEAD" and request.url.path == "/nohead.png":
            return httpx.Response(405)
        if request.method == "HEAD":
            return httpx.Response(200, headers={"content-type": "image/png"})
        return httpx.Response(206, content=PNG[:1])

    async with fetcher(handler) as guarded:
        ok = await guarded.probe("http://img.test/a.png")
        fallback = await guarded.probe("http://img.test/nohead.png")
        gone = await guarded.probe("http://img.test/gone.png")
    assert (ok.ok, ok.status) == (True, 200)
    assert (fallback.ok, fallback.status) == (True, 206)
    assert not gone.ok and gone.reason == (
        "HTTP 404 Not Found from http://img.test/gone.png (the URL has expired or never existed)"
    )
    assert seen == [("HEAD", None), ("HEAD", None), ("GET", "bytes=0-0"), ("HEAD", None)]


async def test_an_unresolvable_host_is_an_unavailable_error_after_retries() -> None:
    resolver = Resolver({})
    async with fetcher(never, resolver=resolver, attempts=2) as guarded:
        with pytest.raises(FetchError, match=re.escape("cannot resolve 'nowhere.test'")) as caught:
            await guarded.fetch("http://nowhere.test/a.png")
    assert caught.value.kind == "unavailable" and resolver.lookups == ["nowhere.test"] * 2
