"""The status call aimed at a job's forecast end: learned from the API's timestamps.

A scripted API (`httpx.MockTransport`) whose jobs end a fixed time after their submit,
and which stamps `created_at`/`finished_at` on its clock, a day away from this host's.
The schedule alone polls every 0.6 s; a 1 s job is then noticed at 1.2 s.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from flux2_pipeline.runcomfy import AsyncRunComfyClient, EditRequest, JobState, PollSchedule
from flux2_pipeline.runcomfy.polling import FORECAST_MIN_JOBS, FinishForecast

BASE = "https://api.test"
REQ = EditRequest(prompt="make it snow", image_urls=("https://img.test/a.png",))
SCHEDULE = PollSchedule(min_interval=0.6, max_interval=0.6, fraction=0)
SLACK = 0.19
"""How late a call may come on a loaded machine and still be told from the next one."""
API_CLOCK_AHEAD = timedelta(days=1)
"""The API's clock is this far from the host's: only differences of its stamps are used."""


class TimedApi:
    """Each job ends `seconds` after its submit arrived; `stamps` False omits the stamps."""

    def __init__(self, seconds: float, *, stamps: bool = True) -> None:
        self.seconds = seconds
        self.stamps = stamps
        self.created: dict[str, float] = {}
        self.status_times: list[float] = []

    def ended(self, request_id: str) -> bool:
        return time.monotonic() >= self.created[request_id] + self.seconds

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and not path.endswith("/cancel"):
            request_id = f"job-{len(self.created)}"
            self.created[request_id] = time.monotonic()
            return httpx.Response(200, json={"request_id": request_id})
        request_id = path.split("/")[-2]
        if path.endswith("/status"):
            self.status_times.append(time.monotonic() - self.created[request_id])
            state = "completed" if self.ended(request_id) else "in_progress"
            return httpx.Response(200, json={"request_id": request_id, "status": state})
        created = datetime.now(UTC) + API_CLOCK_AHEAD
        body = {
            "request_id": request_id,
            "status": "completed",
            "output": {"images": [f"https://cdn.test/{request_id}.png"]},
        }
        if self.stamps:
            body["created_at"] = created.isoformat()
            body["finished_at"] = (created + timedelta(seconds=self.seconds)).isoformat()
        return httpx.Response(200, json=body)


def client_for(api: TimedApi) -> AsyncRunComfyClient:
    return AsyncRunComfyClient("sk-test", BASE, poll=SCHEDULE, transport=httpx.MockTransport(api))


def at(times: list[float], expected: list[float]) -> bool:
    """Each call came at its expected time since the submit, or up to `SLACK` after it."""
    return len(times) == len(expected) and all(
        e <= t < e + SLACK for t, e in zip(times, expected, strict=True)
    )


def learned(forecast: FinishForecast, seconds: float, jobs: int = FORECAST_MIN_JOBS) -> None:
    start = datetime(2026, 11, 25, tzinfo=UTC)
    for _ in range(jobs):
        forecast.observe(start, start + timedelta(seconds=seconds))


def test_the_forecast_is_the_median_of_recent_jobs_plus_a_margin() -> None:
    forecast = FinishForecast(window=4)
    start = datetime(2026, 11, 25, tzinfo=UTC)
    assert forecast.seconds() is None
    forecast.observe(start, None)  # no stamps, nothing learned
    forecast.observe(start, start - timedelta(seconds=1))  # a stamp before its start
    for seconds in (1.0, 1.0):
        forecast.observe(start, start + timedelta(seconds=seconds))
    assert forecast.seconds() is None, f"{FORECAST_MIN_JOBS} jobs are needed"
    forecast.observe(start, start + timedelta(seconds=3.0))
    assert forecast.seconds() == pytest.approx(1.0 + 0.01)
    for seconds in (20.0, 20.0, 20.0):  # the window forgets the first jobs
        forecast.observe(start, start + timedelta(seconds=seconds))
    assert forecast.seconds() == pytest.approx(20.0 * 1.01)


async def test_a_client_learns_its_jobs_end_and_asks_just_after_it() -> None:
    api = TimedApi(1.0)
    async with client_for(api) as client:
        for _ in range(FORECAST_MIN_JOBS):  # learning: the schedule alone, 0.6 s and 1.2 s
            assert (await client.run(REQ)).ok
        assert client.stats.aimed_polls == 0
        assert at(api.status_times, [0.6, 1.2] * FORECAST_MIN_JOBS)
        api.status_times.clear()
        result = await client.run(REQ)
    assert result.state is JobState.COMPLETED
    # 0.6 s as scheduled, then at the forecast (1.0 s and its margin) instead of 1.2 s.
    assert at(api.status_times, [0.6, 1.0]) and result.status_calls == 2
    assert (client.stats.aimed_polls, client.stats.aimed_hits) == (1, 1)


async def test_a_job_slower_than_its_forecast_costs_one_status_call_more() -> None:
    api = TimedApi(1.0)
    async with client_for(api) as client:
        learned(client.forecast, 0.3)
        result = await client.run(REQ)
    assert result.ok
    # 0.3 s aimed (still running), then the schedule again from there: 0.9 s, 1.5 s.
    assert at(api.status_times, [0.3, 0.9, 1.5])
    assert (client.stats.aimed_polls, client.stats.aimed_hits) == (1, 0)


async def test_a_job_followed_long_after_its_submit_is_asked_at_once() -> None:
    api = TimedApi(0.0)
    async with client_for(api) as client:
        learned(client.forecast, 1.0)
        handle = await client.submit(REQ)
        started = time.monotonic()
        long_ago = datetime.now(UTC) - timedelta(minutes=5)
        result = await client.wait(handle.request_id, submitted_at=long_ago)
    assert result.ok and result.status_calls == 1
    assert time.monotonic() - started < 0.5, "not after the schedule's 0.6 s"


async def test_without_the_api_timestamps_the_schedule_alone_decides() -> None:
    api = TimedApi(1.0, stamps=False)
    async with client_for(api) as client:
        for _ in range(FORECAST_MIN_JOBS + 1):
            assert (await client.run(REQ)).ok
    assert client.forecast.seconds() is None
    assert client.stats.aimed_polls == 0
    assert at(api.status_times, [0.6, 1.2] * (FORECAST_MIN_JOBS + 1))
