"""`RunComfyResource.run`: the step's thread waits for the coroutine on the client's loop,
and is woken to report as soon as the coroutine has something for it (a partition's
results and checks), not only on its periodic tick."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from dagster import build_init_resource_context

from flux2_pipeline.resources import RunComfyResource

NEVER_SECONDS = 600.0
"""A tick that never comes within a test: only a wake can call `on_tick` in time."""


@pytest.fixture
def resource() -> Iterator[RunComfyResource]:
    runcomfy = RunComfyResource(base_url="http://127.0.0.1:9")
    context = build_init_resource_context()
    runcomfy.setup_for_execution(context)
    try:
        yield runcomfy
    finally:
        runcomfy.teardown_after_execution(context)


def test_a_wake_calls_on_tick_on_the_waiting_thread_before_the_coroutine_ends(
    resource: RunComfyResource,
) -> None:
    wake, reported = threading.Event(), threading.Event()
    ticks: list[str] = []

    def on_tick() -> None:
        ticks.append(threading.current_thread().name)
        reported.set()

    async def work() -> str:
        wake.set()
        # The coroutine ends only once the step's thread has reported: without the wake it
        # would wait for a tick ten minutes away, and fail here.
        seen = await asyncio.to_thread(reported.wait, 60)
        assert seen, "on_tick was not called after the wake"
        return "done"

    result = resource.run(work(), on_tick=on_tick, tick_seconds=NEVER_SECONDS, wake=wake)

    assert result == "done"
    assert ticks == [threading.current_thread().name]  # once, on the step's thread


def test_without_a_wake_the_run_returns_as_soon_as_the_coroutine_ends(
    resource: RunComfyResource,
) -> None:
    ticks: list[str] = []

    async def work() -> int:
        return 7

    assert (
        resource.run(work(), on_tick=lambda: ticks.append("tick"), tick_seconds=NEVER_SECONDS) == 7
    )
    assert ticks == []


def test_an_error_in_the_coroutine_reaches_the_step(resource: RunComfyResource) -> None:
    async def work() -> None:
        raise ValueError("broken partition")

    with pytest.raises(ValueError, match="broken partition"):
        resource.run(work(), tick_seconds=NEVER_SECONDS, wake=threading.Event())
