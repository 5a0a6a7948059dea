"""The client's one HTTP path gives the same results over either transport: the default
(`AiohttpTransport`) and httpx's own pool (`httpx.AsyncHTTPTransport`, through
`HttpxTransport`) put the same request on the wire (method, escaped path, body, the
headers the client sets) and turn the same answers into the same values and errors,
gzip-encoded bodies included."""

from __future__ import annotations

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

pytestmark = pytest.mark.timeout(30)

TOKEN = "sk-parity-0c9d8e7f"
# The headers the client sets; each transport adds its own Accept-Encoding and such.
CLIENT_HEADERS = {"accept", "authorization", "content-type", "content-length", "host"}
Seen = tuple[str, str, list[tuple[str, str]], bytes]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def _api(seen: list[Seen], port: int) -> AsyncIterator[str]:
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
    site = web.TCPSite(runner, "127.0.0.1", port)
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


def _wire(seen: list[Seen]) -> list[Seen]:
    return [
        (
            method,
            path,
            sorted((k.lower(), v) for k, v in headers if k.lower() in CLIENT_HEADERS),
            body,
        )
        for method, path, headers, body in seen
    ]


async def test_both_transports_send_and_read_alike(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    runs: list[tuple[list[Seen], list[Any]]] = []
    port = _free_port()  # the same Host header for both runs
    for transport in (None, httpx.AsyncHTTPTransport()):
        seen: list[Seen] = []
        async with _api(seen, port) as base_url, _client(base_url, transport) as client:
            outcomes = await _exercise(client)
        runs.append((seen, outcomes))
    (aiohttp_seen, aiohttp_outcomes), (httpx_seen, httpx_outcomes) = runs
    assert _wire(aiohttp_seen) == _wire(httpx_seen) and len(aiohttp_seen) == 9
    assert aiohttp_outcomes == httpx_outcomes and len(aiohttp_outcomes) == 7
    for _, _, headers, _ in aiohttp_seen + httpx_seen:
        assert ("User-Agent", "flux2-pipeline") in headers
        assert ("Authorization", f"Bearer {TOKEN}") in headers
    submit_body = aiohttp_seen[0][3]
    assert json.loads(submit_body)["prompt"] == "snöw ✓"
    assert "snöw ✓".encode() in submit_body  # UTF-8 on the wire, not \u escapes
    assert aiohttp_seen[1][1] == "/base/v1/requests/a%20b%2Fc/status"
    assert aiohttp_seen[2][1] == "/base/v1/requests/a%20b%2Fc/result?include_cost=true"
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("transport", [None, httpx.AsyncHTTPTransport()], ids=["aiohttp", "httpx"])
async def test_both_transports_map_a_refused_connection_to_not_sent(
    transport: httpx.AsyncBaseTransport | None,
) -> None:
    retry = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0)
    refused = f"http://127.0.0.1:{_free_port()}"
    async with AsyncRunComfyClient(None, refused, retry=retry, transport=transport) as client:
        with pytest.raises(TransportError) as caught:
            await client.submit(EditRequest(prompt="p", image_urls=("http://x/a.png",)))
        assert client.stats.retries == 2
    assert not isinstance(caught.value, SubmissionOutcomeUnknown)
    assert caught.value.sent is False
