"""Idle pooled connections that the server has closed cost no unknown submit.

A server closes an idle keep-alive connection after its own timeout (uvicorn: 5 s). A
request the client writes onto such a connection fails without saying whether the server
read it, so a paid submit would end "outcome unknown" although the server never saw it.
The client's pool drops idle connections sooner than servers commonly do, and never
writes on a pooled connection whose socket already shows the server's close. The
emulator's own counters say what the server received.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.runcomfy import AsyncRunComfyClient, EditRequest, SubmissionOutcomeUnknown
from flux2_pipeline.runcomfy.transport import POOL_KEEPALIVE_SECONDS

pytestmark = pytest.mark.timeout(120)

WAVE = 64


async def _wave(
    client: AsyncRunComfyClient, base_url: str, first: int, finished: list[float]
) -> int:
    """Submit `WAVE` jobs at once; the number whose outcome was unknown."""
    loop = asyncio.get_running_loop()

    async def one(index: int) -> int:
        request = EditRequest(prompt=f"p{index}", image_urls=[f"{base_url}/samples/cat.png"])
        try:
            await client.submit(request)
        except SubmissionOutcomeUnknown:
            return 1
        finally:
            finished.append(loop.time())
        return 0

    return sum(await asyncio.gather(*(one(first + i) for i in range(WAVE))))


def _emulator(keep_alive: float) -> EmulatorServer:
    # Jobs never finish during the test: only the submits' connections matter.
    config = EmulatorConfig(port=0, keep_alive=keep_alive, latency=600.0, max_concurrent=1000)
    return EmulatorServer(config)


@pytest.mark.parametrize("pool", ["aiohttp", "httpx"])
def test_a_busy_loop_never_writes_on_connections_the_server_closed_meanwhile(pool: str) -> None:
    """The client's event loop is busy (a CPU-bound stretch) past the server's keep-alive:
    the server's closes arrive unprocessed, so aiohttp still believes the connections open.
    httpx's pool (httpcore) checks an idle socket's readability itself."""

    async def run(base_url: str) -> int:
        transport = httpx.AsyncHTTPTransport() if pool == "httpx" else None
        async with AsyncRunComfyClient("token", base_url, transport=transport) as client:
            unknown = await _wave(client, base_url, 0, [])
            time.sleep(2.0)  # blocks the loop, as a long synchronous step does
            return unknown + await _wave(client, base_url, WAVE, [])

    with _emulator(keep_alive=1.0) as emulator:
        unknown = asyncio.run(run(emulator.base_url))
        counters = emulator.state.counters
        assert unknown == 0
        assert counters.submits_total == counters.jobs_created == 2 * WAVE


def test_idle_as_long_as_the_servers_keep_alive_costs_no_unknown_submit() -> None:
    """The second wave starts when the server closes the first wave's connections (its
    keep-alive after their answers): the pool has dropped them already."""
    keep_alive = EmulatorConfig().keep_alive
    assert keep_alive > POOL_KEEPALIVE_SECONDS

    async def run(base_url: str) -> int:
        loop = asyncio.get_running_loop()
        async with AsyncRunComfyClient("token", base_url) as client:
            answered: list[float] = []
            unknown = await _wave(client, base_url, 0, answered)
            # Half the server's keep-alive timers have run out at this moment: the burst
            # lands among its closes, where a stale connection would be written to.
            await asyncio.sleep(statistics.median(answered) + keep_alive + 0.005 - loop.time())
            return unknown + await _wave(client, base_url, WAVE, [])

    with _emulator(keep_alive=keep_alive) as emulator:
        unknown = asyncio.run(run(emulator.base_url))
        counters = emulator.state.counters
        assert unknown == 0
        assert counters.submits_total == counters.jobs_created == 2 * WAVE
