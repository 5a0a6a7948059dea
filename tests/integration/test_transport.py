"""The transports over real loopback sockets: each way a call can fail maps to the
httpx exception that tells whether the request may have been sent, and so to the right
client error (a paid submit is never retried after its request may have left); each
submit answer is classified by what it proves about the job."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import httpx
import pytest

from flux2_pipeline.runcomfy import (
    AsyncRunComfyClient,
    EditRequest,
    RetryPolicy,
    SubmissionOutcomeUnknown,
)
from flux2_pipeline.runcomfy.errors import TransportError
from flux2_pipeline.runcomfy.transport import (
    AiohttpTransport,
    HttpTransport,
    HttpxTransport,
    RawResponse,
    default_transport,
    httpx_error_for,
)

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _serve(handler: Handler) -> AsyncIterator[str]:
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handler(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the handlers see their connections closed


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.close()


async def _half_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    writer.close()


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await reader.read()  # until the client gives up and closes
    writer.close()


def _answer(status_line: str, body: bytes, content_type: str = "application/json") -> Handler:
    """A server that reads the request (so a real server would have created the job)
    and answers with these bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        head = (
            f"HTTP/1.1 {status_line}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    return handler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _get(base_url: str, timeout: float | httpx.Timeout = 5.0) -> RawResponse:
    transport = AiohttpTransport(max_connections=4)
    try:
        headers = {"Content-Type": "application/json"}
        return await transport.send(
            "POST", f"{base_url}/x", headers, b'{"a":1}', httpx.Timeout(timeout)
        )
    finally:
        await transport.aclose()


def test_default_transport_is_aiohttp_and_both_kinds_are_http_transports() -> None:
    transport = default_transport(8, "http://127.0.0.1:1")
    assert isinstance(transport, AiohttpTransport) and transport.max_connections == 8
    assert isinstance(transport, HttpTransport)
    assert isinstance(HttpxTransport(httpx.AsyncHTTPTransport()), HttpTransport)


async def test_a_plain_answer_comes_back_whole() -> None:
    async with _serve(_answer("201 Created", b'{"ok":true}')) as base_url:
        answer = await _get(base_url)
    assert answer.status_code == 201
    assert answer.content == b'{"ok":true}'
    assert answer.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            aiohttp.ClientConnectorError(
                aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None),
                OSError(111, "refused"),
            ),
            httpx.ConnectError,
        ),
        (aiohttp.ConnectionTimeoutError(), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError(), httpx.ReadTimeout),
        (aiohttp.ServerTimeoutError(), httpx.ReadTimeout),
        (TimeoutError(), httpx.ReadTimeout),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientPayloadError(), httpx.RemoteProtocolError),
        (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
        (aiohttp.InvalidURL("x"), httpx.UnsupportedProtocol),
        (aiohttp.ClientError(), httpx.TransportError),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_error_table(error: BaseException, expected: type[httpx.TransportError]) -> None:
    assert httpx_error_for(error) is expected


async def test_connection_refused_is_connect_error() -> None:
    with pytest.raises(httpx.ConnectError):
        await _get(f"http://127.0.0.1:{_free_port()}")


async def test_closed_without_answer_is_remote_protocol_error() -> None:
    async with _serve(_close_at_once) as base_url:
        with pytest.raises(httpx.RemoteProtocolError):
            await _get(base_url)


async def test_cut_off_body_is_remote_protocol_error() -> None:
    async with _serve(_half_body) as base_url:
        with pytest.raises(httpx.RemoteProtocolError):
            await _get(base_url)


async def test_no_answer_in_time_is_read_timeout() -> None:
    async with _serve(_never_answer) as base_url:
        with pytest.raises(httpx.ReadTimeout):
            # Only the wait for an answer is short: a slow connect must not pass for it.
            await _get(base_url, timeout=httpx.Timeout(30.0, read=0.2))


def _request() -> EditRequest:
    return EditRequest.parse({"prompt": "snow", "image_urls": ["http://127.0.0.1/a.png"]})


def _counted(handler: Handler) -> tuple[Handler, list[int]]:
    """`handler`, counting the connections it serves in the returned one-item list."""
    requests = [0]

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests[0] += 1
        await handler(reader, writer)

    return counting, requests


@pytest.mark.parametrize("handler", [_close_at_once, _half_body], ids=["closed", "cut-off"])
async def test_dropped_submit_is_outcome_unknown_and_sent_once(handler: Handler) -> None:
    counting, requests = _counted(handler)
    async with _serve(counting) as base_url:
        retry = RetryPolicy(max_attempts=5, base_delay=0.0, max_delay=0.0)
        async with AsyncRunComfyClient(None, base_url, retry=retry) as client:
            with pytest.raises(SubmissionOutcomeUnknown):
                await client.submit(_request())
    assert requests == [1]


async def test_submit_without_answer_in_time_is_outcome_unknown_and_sent_once() -> None:
    # The default (aiohttp) transport's read timeout on a submit whose request the server
    # read in full; the emulator test does the same through httpx's pool.
    counting, requests = _counted(_never_answer)
    async with _serve(counting) as base_url:
        retry = RetryPolicy(max_attempts=5, base_delay=0.0, max_delay=0.0)
        timeout = httpx.Timeout(30.0, read=0.2)
        async with AsyncRunComfyClient(None, base_url, retry=retry, timeout=timeout) as client:
            with pytest.raises(SubmissionOutcomeUnknown) as caught:
                await client.submit(_request())
            assert client.stats.retries == 0
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
    assert requests == [1]


async def test_refused_submit_is_not_sent() -> None:
    retry = RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0)
    async with AsyncRunComfyClient(None, f"http://127.0.0.1:{_free_port()}", retry=retry) as client:
        with pytest.raises(TransportError) as caught:
            await client.submit(_request())
    assert not isinstance(caught.value, SubmissionOutcomeUnknown)
    assert caught.value.sent is False


@pytest.mark.parametrize(
    ("answer", "status_code"),
    [
        (_answer("502 Bad Gateway", b'{"error_code":"BAD_GATEWAY","error_message":"x"}'), 502),
        (_answer("502 Bad Gateway", b"<html>bad gateway</html>", "text/html"), 502),
        (_answer("503 Service Unavailable", b'{"error_code":"OVERLOADED"}'), 503),
        (_answer("408 Request Timeout", b""), 408),
        (_answer("200 OK", b'{"status_url":"http://x/s"}'), 200),
        (_answer("200 OK", b"<html>welcome</html>", "text/html"), 200),
        (_answer("200 OK", b'{"request_id":'), 200),
        (_close_at_once, None),
        (_half_body, None),
    ],
    ids=[
        "502-with-body",
        "502-html",
        "503-with-body",
        "408",
        "200-no-request-id",
        "200-not-json",
        "200-truncated-json",
        "closed",
        "cut-off",
    ],
)
async def test_submit_outcomes_over_loopback_without_proof_are_unknown(
    answer: Handler, status_code: int | None
) -> None:
    requests = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await answer(reader, writer)

    async with _serve(counting) as base_url:
        retry = RetryPolicy(max_attempts=5, base_delay=0.0, max_delay=0.0)
        async with AsyncRunComfyClient(None, base_url, retry=retry) as client:
            with pytest.raises(SubmissionOutcomeUnknown) as caught:
                await client.submit(_request())
    assert requests == 1
    assert caught.value.status_code == status_code


@pytest.mark.parametrize(
    ("status_line", "cls"),
    [
        ("400 Bad Request", "BadRequestError"),
        ("401 Unauthorized", "AuthenticationError"),
        ("402 Payment Required", "InsufficientCreditError"),
        ("403 Forbidden", "AuthenticationError"),
        ("404 Not Found", "NotFoundError"),
        ("422 Unprocessable Entity", "RequestRejectedError"),
    ],
)
async def test_submit_outcomes_over_loopback_proving_no_job_are_typed(
    status_line: str, cls: str
) -> None:
    requests = 0
    answer = _answer(status_line, b'{"error_message":"no"}')

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await answer(reader, writer)

    async with _serve(counting) as base_url, AsyncRunComfyClient(None, base_url) as client:
        with pytest.raises(Exception) as caught:
            await client.submit(_request())
    assert type(caught.value).__name__ == cls
    assert requests == 1


@pytest.mark.parametrize(
    ("target", "first_line"),
    [
        ("http://api.invalid/v1/x", b"GET http://api.invalid/v1/x HTTP/1.1\r\n"),
        ("https://api.invalid/v1/x", b"CONNECT api.invalid:443 HTTP/1.1\r\n"),
    ],
    ids=["http", "https-tunnel"],
)
async def test_the_proxy_gets_the_request_and_its_credentials(
    target: str, first_line: bytes
) -> None:
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with _serve(proxy) as proxy_url:
        proxied = proxy_url.replace("http://", "http://user:s3cret@")
        transport = AiohttpTransport(max_connections=2, proxy=proxied)
        try:
            answer = await transport.send("GET", target, {}, None, httpx.Timeout(5.0))
            assert answer.status_code == 403  # the proxy's own answer for plain HTTP
        except httpx.TransportError:
            assert target.startswith("https:")  # the tunnel was refused
        finally:
            await transport.aclose()
    (head,) = seen
    assert head.startswith(first_line)
    assert b"Proxy-Authorization: Basic dXNlcjpzM2NyZXQ=" in head
    assert "s3cret" not in repr(transport)


def test_proxy_settings_are_read_once_for_the_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from flux2_pipeline.runcomfy.transport import proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp.test:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert proxy_for("https://model-api.runcomfy.net") == "http://proxy.corp.test:3128"
    assert proxy_for("http://127.0.0.1:8188") is None
    monkeypatch.delenv("HTTPS_PROXY")
    assert proxy_for("https://model-api.runcomfy.net") is None
