"""The aiohttp transport over real loopback sockets: each way a call can fail maps to the
httpx exception that tells whether the request may have been sent, and so to the right
client error (a paid submit is never retried after its request may have left)."""

from __future__ import annotations

import asyncio
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
from flux2_pipeline.runcomfy.transport import AiohttpTransport, default_transport, httpx_error_for
from tests.conftest import refused_port

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)


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


async def _get(base_url: str, timeout: float = 5.0) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=AiohttpTransport(limits=LIMITS), timeout=timeout
    ) as http:
        return await http.post(f"{base_url}/x", json={"a": 1})


def test_default_transport_is_aiohttp() -> None:
    assert isinstance(default_transport(LIMITS), AiohttpTransport)
    client = AsyncRunComfyClient(None, "http://127.0.0.1:1")
    assert isinstance(client._http._transport, AiohttpTransport)


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
        await _get(f"http://127.0.0.1:{refused_port()}")


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
            await _get(base_url, timeout=0.2)


def _request() -> EditRequest:
    return EditRequest.parse({"prompt": "snow", "image_urls": ["http://127.0.0.1/a.png"]})


@pytest.mark.parametrize("handler", [_close_at_once, _half_body], ids=["closed", "cut-off"])
async def test_dropped_submit_is_outcome_unknown_and_sent_once(handler: Handler) -> None:
    requests = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await handler(reader, writer)

    async with _serve(counting) as base_url:
        retry = RetryPolicy(max_attempts=5, base_delay=0.0, max_delay=0.0)
        async with AsyncRunComfyClient(None, base_url, retry=retry) as client:
            with pytest.raises(SubmissionOutcomeUnknown):
                await client.submit(_request())
    assert requests == 1


async def test_refused_submit_is_not_sent() -> None:
    retry = RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0)
    async with AsyncRunComfyClient(
        None, f"http://127.0.0.1:{refused_port()}", retry=retry
    ) as client:
        with pytest.raises(TransportError) as caught:
            await client.submit(_request())
    assert not isinstance(caught.value, SubmissionOutcomeUnknown)
    assert caught.value.sent is False


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


def test_proxy_settings_are_read_once_for_the_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from flux2_pipeline.runcomfy.transport import proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp.test:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    proxy = proxy_for("https://model-api.runcomfy.net")
    assert proxy is not None and proxy.url.host == "proxy.corp.test"
    assert proxy_for("http://127.0.0.1:8188") is None
    monkeypatch.delenv("HTTPS_PROXY")
    assert proxy_for("https://model-api.runcomfy.net") is None
