"""The client's fast path (`AiohttpTransport.fetch`, used with the default transport) puts
the same bytes on the wire, logs the same httpx line and maps answers and failures the
same way as the general path through `httpx.AsyncClient` (forced here with a subclass of
the transport, which the client never takes the fast path for)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web

from flux2_pipeline.runcomfy import (
    AsyncRunComfyClient,
    EditRequest,
    RetryPolicy,
    RunComfyError,
    SubmissionOutcomeUnknown,
)
from flux2_pipeline.runcomfy.errors import TransportError
from flux2_pipeline.runcomfy.transport import AiohttpTransport
from tests.conftest import refused_port

pytestmark = pytest.mark.timeout(30)

TOKEN = "sk-fast-path-0c9d8e7f"
Seen = tuple[str, str, list[tuple[str, str]], bytes]


class _GeneralPath(AiohttpTransport):
    """Same transport, but not exactly the class, so the client goes through httpx."""


@asynccontextmanager
async def _api(seen: list[Seen]) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(
            (
                request.method,
                str(request.rel_url),
                list(request.headers.items()),
                await request.read(),
            )
        )
        path = request.path
        if "gzip" in path:
            body = gzip.compress(json.dumps({"request_id": "z", "status": "in_queue"}).encode())
            return web.Response(
                body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
            )
        if "list" in path:
            return web.json_response([1, 2])
        if "gateway" in path:
            return web.Response(status=502, text="bad gateway")
        if path.endswith("/cancel"):
            return web.json_response(
                {"error_code": "SLOW", "error_message": "slow down"},
                status=429,
                headers={"Retry-After": "0"},
                reason="Slow Down",
            )
        return web.json_response(
            {"request_id": "a b/c", "status": "completed", "output": {"image": "http://x/o.png"}}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and served as is: the port is never released
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/base/"
    finally:
        await runner.cleanup()


async def _exercise(client: AsyncRunComfyClient) -> list[Any]:
    outcomes: list[Any] = []
    request = EditRequest(prompt="snöw ✓", image_urls=("http://x/a.png",))
    outcomes.append(await client.submit(request))
    outcomes.append(await client.status("a b/c"))
    outcomes.append(await client.result("a b/c"))
    outcomes.append(await client.status("gzip"))
    for request_id in ("x", "list", "gateway"):
        try:
            await client.cancel(request_id)
        except RunComfyError as error:
            outcomes.append((type(error).__name__, str(error), getattr(error, "retry_after", None)))
    return outcomes


def _client(base_url: str, transport: httpx.AsyncBaseTransport | None) -> AsyncRunComfyClient:
    retry = RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0)
    return AsyncRunComfyClient(TOKEN, base_url, transport=transport, retry=retry)


async def test_fast_path_matches_the_general_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    runs: list[tuple[list[Seen], list[Any], list[str]]] = []
    seen: list[Seen] = []
    async with _api(seen) as base_url:  # one server: the same Host header for both runs
        for transport in (None, _GeneralPath(limits=httpx.Limits(max_connections=4))):
            seen.clear()
            caplog.clear()
            async with _client(base_url, transport) as client:
                assert (client._fast is not None) is (transport is None)
                outcomes = await _exercise(client)
                lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
            runs.append((list(seen), outcomes, lines))
    (fast_seen, fast_outcomes, fast_log), (general_seen, general_outcomes, general_log) = runs
    assert fast_seen == general_seen
    assert fast_outcomes == general_outcomes and len(fast_outcomes) == 7
    assert fast_log == general_log and len(fast_log) == len(fast_seen)
    assert all(("Authorization", f"Bearer {TOKEN}") in headers for _, _, headers, _ in fast_seen)
    assert not any(TOKEN in line for line in fast_log)


async def test_fast_path_maps_transport_failures() -> None:
    retry = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0)
    refused = f"http://127.0.0.1:{refused_port()}"
    async with AsyncRunComfyClient(None, refused, retry=retry) as client:
        assert client._fast is not None
        with pytest.raises(TransportError) as caught:
            await client.submit(EditRequest(prompt="p", image_urls=("http://x/a.png",)))
    assert not isinstance(caught.value, SubmissionOutcomeUnknown)
    assert caught.value.sent is False

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AsyncRunComfyClient(None, f"http://127.0.0.1:{port}", retry=retry) as client:
            with pytest.raises(TransportError) as on_status:
                await client.status("job")
            assert client.stats.retries == 2
    finally:
        server.close()
        await server.wait_closed()
    assert "no answer (RemoteProtocolError)" in str(on_status.value)
