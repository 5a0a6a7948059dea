"""The async client against the emulator over real loopback sockets, no mocks.

Each test starts its own emulator (port 0) so fault settings and counters never
leak between tests. The emulator runs in a background thread with its own event
loop; its counters are read here once the client has finished the calls in question.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer, Job
from flux2_pipeline.runcomfy import (
    AsyncRunComfyClient,
    AuthenticationError,
    EditRequest,
    EditResult,
    JobDeadlineExceeded,
    JobLostError,
    JobState,
    PollSchedule,
    RateLimitError,
    RetryPolicy,
    SubmissionOutcomeUnknown,
    TransportError,
)
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

TOKEN = "emu-token-9d41c7e2b0aa"
FAST_POLL = PollSchedule(min_interval=0.02, max_interval=0.1, fraction=0.1)
# With p ~= 0.19 of a faulted call, 12 attempts fail with p ~= 2e-9 per call.
PATIENT_RETRY = RetryPolicy(max_attempts=12, base_delay=0.01, max_delay=0.1)
SAMPLES = ("cat", "dog", "sun", "beach_01")


class _Emulators:
    """Starts emulators on demand and stops all of them at teardown."""

    def __init__(self) -> None:
        self.servers: list[EmulatorServer] = []

    def __call__(self, **settings: Any) -> EmulatorServer:
        server = EmulatorServer(EmulatorConfig(port=0, seed=5, **settings))
        server.start()
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def make_emulator() -> Iterator[_Emulators]:
    emulators = _Emulators()
    try:
        yield emulators
    finally:
        emulators.stop_all()


def request(base_url: str, seed: int, **params: Any) -> EditRequest:
    urls = [f"{base_url}/samples/{SAMPLES[seed % len(SAMPLES)]}.png"]
    return EditRequest.parse(
        {"prompt": f"make it snow #{seed}", "image_urls": urls, "seed": seed, **params}
    )


def client_for(server: EmulatorServer, **options: Any) -> AsyncRunComfyClient:
    settings: dict[str, Any] = {
        "token": TOKEN,
        "timeout": 10.0,
        "retry": PATIENT_RETRY,
        "poll": FAST_POLL,
        **options,
    }
    return AsyncRunComfyClient(base_url=server.base_url, **settings)


def jobs_by_seed(server: EmulatorServer, seed: int) -> list[Job]:
    return [job for job in list(server.state.jobs.values()) if job.request.seed == seed]


async def test_many_jobs_survive_429_and_5xx_without_duplicates(
    make_emulator: _Emulators,
) -> None:
    # Submits see 429s only (a 5xx on a submit is an unknown outcome, tested below);
    # once every job is acknowledged, status and result calls see 429s and 5xx too.
    server = make_emulator(
        token=TOKEN, latency=0.05, max_concurrent=32, fault_429=0.1, retry_after="0.05"
    )
    requests = [request(server.base_url, seed, image_size="square") for seed in range(200)]
    slots = asyncio.Semaphore(16)

    async def submit(req: EditRequest) -> str:
        async with slots:
            return (await client.submit(req)).request_id

    async def wait(request_id: str) -> EditResult:
        async with slots:
            return await client.wait(request_id)

    counters = server.state.counters
    # Read timeout: the held submits wait for the test, however slow the machine is.
    async with client_for(server, timeout=httpx.Timeout(10.0, read=60.0)) as client:
        # Answers and jobs are held until 16 submits are in flight at once (the client's
        # 16 connections), each with its job running: the calls overlap for certain.
        server.state.faults.update(hold_submits=True, hold_jobs=True)
        try:
            submitting = asyncio.gather(*(submit(req) for req in requests))
            await asyncio.to_thread(
                wait_until, lambda: counters.held_submits_now == 16, "16 held submits", timeout=30
            )
            assert counters.jobs_created == counters.in_progress_now == 16
        finally:
            server.state.faults.update(hold_submits=False, hold_jobs=False)
        request_ids = await submitting
        submit_retries = client.stats.retries
        assert server.state.counters.rejected_429 == submit_retries > 0
        server.state.faults.update(fault_5xx=0.1)
        results = await asyncio.gather(*(wait(rid) for rid in request_ids))
        stats = client.stats

        assert all(result.ok and len(result.output_urls) == 1 for result in results)
        assert [result.request_id for result in results] == request_ids
        assert len(set(request_ids)) == 200

        some = sorted(results, key=lambda result: result.request_id)[:4]
        async with httpx.AsyncClient(timeout=10) as plain:
            for result in some:
                response = await plain.get(result.output_urls[0])
                assert response.status_code == 200
                image = Image.open(io.BytesIO(response.content))
                image.load()
                assert image.format == "PNG" and image.size == (512, 512)

    assert counters.jobs_created == 200 and counters.completed_jobs == 200
    assert counters.duplicate_bodies == 0
    assert len(counters.body_submissions) == 200
    assert 16 <= counters.max_in_progress <= 32  # the emulator runs at most 32 at once
    assert counters.rejected_429 > 0 and counters.rejected_5xx > 0
    assert counters.rejected_401 == 0
    # Every injected fault cost the client exactly one retry, and nothing else did.
    assert stats.retries == counters.rejected_429 + counters.rejected_5xx > 0
    assert stats.submits == 200 and stats.result_calls >= 200


async def test_submit_answered_5xx_is_outcome_unknown_and_never_retried(
    make_emulator: _Emulators,
) -> None:
    # The emulator's 503 carries its own error body; still no proof that no job exists.
    server = make_emulator(token=TOKEN, fault_5xx=1.0)
    async with client_for(server) as client:
        with pytest.raises(SubmissionOutcomeUnknown) as caught:
            await client.submit(request(server.base_url, 4))
        assert client.stats.retries == 0
    assert caught.value.status_code == 503
    counters = server.state.counters
    assert counters.submits_total == 1 and counters.rejected_5xx == 1


async def test_submit_answered_429_is_retried_then_a_rate_limit_error(
    make_emulator: _Emulators,
) -> None:
    server = make_emulator(token=TOKEN, fault_429=1.0, retry_after="0.01")
    retry = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0)
    async with client_for(server, retry=retry) as client:
        with pytest.raises(RateLimitError):
            await client.submit(request(server.base_url, 5))
    counters = server.state.counters
    assert counters.submits_total == 3 and counters.jobs_created == 0


async def test_submit_to_a_refused_port_is_retried_and_not_sent() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        retry = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0)
        async with AsyncRunComfyClient(
            TOKEN, f"http://127.0.0.1:{port}", retry=retry, timeout=5.0
        ) as client:
            with pytest.raises(TransportError) as caught:
                await client.submit(request("http://127.0.0.1:1", 6))
            assert client.stats.retries == 2
    assert not isinstance(caught.value, SubmissionOutcomeUnknown)
    assert caught.value.sent is False


async def test_a_job_the_api_no_longer_knows_is_lost_after_the_grace(
    make_emulator: _Emulators,
) -> None:
    server = make_emulator(token=TOKEN, latency=0.05)
    async with client_for(server, lost_job_grace=0.2) as client:
        with pytest.raises(JobLostError) as caught:
            await client.wait("never-created-0001")
    assert caught.value.request_id == "never-created-0001"
    counters = server.state.counters
    assert counters.status_calls >= 2 and counters.result_calls >= 2


async def test_deadline_cancels_the_queued_job(make_emulator: _Emulators) -> None:
    # The blocker never finishes while jobs are held, so the second job stays queued
    # until the client's 0.3 s deadline gives up on it, however slow the machine is.
    server = make_emulator(token=TOKEN, latency=0.05, max_concurrent=1)
    server.state.faults.update(hold_jobs=True)
    async with client_for(server) as client:
        blocker = await client.submit(request(server.base_url, 1))
        assert server.state.jobs[blocker.request_id].state is JobState.IN_PROGRESS

        with pytest.raises(JobDeadlineExceeded) as caught:
            await client.run(request(server.base_url, 2), deadline=0.3)

        rid = caught.value.request_id
        assert rid is not None and rid != blocker.request_id
        assert (await client.status(rid)).state is JobState.CANCELLED
        assert (await client.status(blocker.request_id)).state is JobState.IN_PROGRESS
        assert client.stats.cancel_calls == 1

    counters = server.state.counters
    assert server.state.jobs[rid].state is JobState.CANCELLED
    assert counters.cancelled_jobs == 1 and counters.cancel_calls >= 1
    assert counters.jobs_created == 2 and counters.completed_jobs == 0


async def test_bad_token_is_a_typed_error_that_never_shows_the_token(
    make_emulator: _Emulators, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_emulator(token=TOKEN)
    wrong = "wrong-token-5b1e0c77f3"
    async with client_for(server, token=wrong) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.submit(request(server.base_url, 1))
        with pytest.raises(AuthenticationError) as on_status:
            await client.status("some-id")
        assert client.stats.retries == 0
        assert wrong not in repr(client) and TOKEN not in repr(client)

    error = caught.value
    assert error.status_code == 401 and error.error_code == "400004"
    assert on_status.value.status_code == 401
    for text in (str(error), repr(error), str(on_status.value), repr(on_status.value)):
        assert wrong not in text and TOKEN not in text
    assert caplog.records, "the client and httpx log at DEBUG; the check must see something"
    assert wrong not in caplog.text and TOKEN not in caplog.text
    counters = server.state.counters
    assert counters.rejected_401 == 2 and counters.submits_total == 1
    assert counters.jobs_created == 0


async def test_dropped_submit_is_outcome_unknown_and_never_resubmitted(
    make_emulator: _Emulators,
) -> None:
    server = make_emulator(token=TOKEN)
    server.state.faults.update(drop_submits=1)
    req = request(server.base_url, 7)
    async with client_for(server) as client:
        with pytest.raises(SubmissionOutcomeUnknown):
            await client.submit(req)
        assert client.stats.submits == 1 and client.stats.retries == 0

    counters = server.state.counters
    assert counters.dropped_submits == 1
    assert counters.submits_total == 1
    assert counters.jobs_created == 1 and counters.duplicate_bodies == 0
    assert len(jobs_by_seed(server, 7)) == 1


class _ReadsOnceHeld(httpx.AsyncBaseTransport):
    """httpx's own pool over real sockets; a request's wait for its answer (the read
    timeout's clock) starts only once the emulator holds a submit's answer.

    httpcore awaits the `trace` extension before it reads the answer's headers, so however
    slowly a loaded machine runs the emulator's thread, the job exists before the client
    can give up on it: the read timeout then ends the call for certain.
    """

    def __init__(self, held: Callable[[], bool]) -> None:
        self.held = held
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        async def trace(event: str, _info: dict[str, Any]) -> None:
            if event == "http11.receive_response_headers.started":
                await asyncio.to_thread(wait_until, self.held, "the held submits", timeout=30)

        request.extensions["trace"] = trace
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_slow_submit_is_outcome_unknown_and_never_resubmitted(
    make_emulator: _Emulators,
) -> None:
    # The emulator creates the job, then withholds the answer until told; the client reads
    # only once the answer is held, so its own read timeout certainly ends the call.
    server = make_emulator(token=TOKEN)
    server.state.faults.update(hold_submits=True)
    counters = server.state.counters
    req = request(server.base_url, 8)
    transport = _ReadsOnceHeld(lambda: counters.held_submits_now == 1)
    # Connecting and sending get all the time a loaded machine needs (a slow connect must
    # not pass for a read timeout); the wait for the held answer is short.
    timeout = httpx.Timeout(30.0, read=0.2)
    try:
        async with client_for(server, timeout=timeout, transport=transport) as client:
            with pytest.raises(SubmissionOutcomeUnknown) as caught:
                await client.submit(req)
            assert client.stats.submits == 1 and client.stats.retries == 0
        assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
        assert counters.held_submits_now == 1, "the answer was still held: no server reply"
    finally:
        server.state.faults.update(hold_submits=False)

    assert counters.submits_total == 1
    assert counters.jobs_created == 1 and counters.duplicate_bodies == 0
    assert len(jobs_by_seed(server, 8)) == 1


async def test_model_failure_is_a_failed_result_not_an_exception(
    make_emulator: _Emulators,
) -> None:
    server = make_emulator(token=TOKEN, fail_rate=1.0)
    async with client_for(server) as client:
        result = await client.run(request(server.base_url, 3))

    assert result.state is JobState.FAILED
    assert not result.ok and result.output_urls == ()
    assert result.error is not None
    assert result.error == "Model run failed"  # the service's own words
    assert result.status_calls >= 1 and result.submitted_at is not None
    assert server.state.counters.failed_jobs == 1


async def test_caller_cancellation_cancels_the_queued_job(make_emulator: _Emulators) -> None:
    # The blocker never finishes while jobs are held, so the second job stays queued for
    # as long as the test needs, however slow the machine is.
    server = make_emulator(token=TOKEN, latency=0.05, max_concurrent=1)
    server.state.faults.update(hold_jobs=True)
    counters = server.state.counters
    async with client_for(server) as client:
        blocker = await client.submit(request(server.base_url, 1))
        task = asyncio.create_task(client.run(request(server.base_url, 2)))
        # Cancel only once the job exists and the client is polling it.
        await asyncio.to_thread(
            wait_until,
            lambda: counters.jobs_created == 2 and counters.status_calls >= 1,
            "2 jobs and a status call",
            timeout=5.0,
        )
        (queued,) = jobs_by_seed(server, 2)
        assert queued.state is JobState.IN_QUEUE

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.stats.cancel_calls == 1
        assert (await client.status(queued.request_id)).state is JobState.CANCELLED
        assert (await client.status(blocker.request_id)).state is JobState.IN_PROGRESS

    assert server.state.jobs[queued.request_id].state is JobState.CANCELLED
    assert counters.cancelled_jobs == 1 and counters.cancel_calls == 1
    assert counters.jobs_created == 2


async def test_the_emulator_stamps_teach_the_client_when_its_jobs_end(
    make_emulator: _Emulators,
) -> None:
    # 0.4 s jobs, polled every 0.3 s by the schedule alone: noticed at 0.6 s. Once three
    # jobs completed, the emulator's created_at/finished_at put the forecast at 0.4 s.
    server = make_emulator(token=TOKEN, latency=0.4, max_concurrent=4)
    every_300_ms = PollSchedule(min_interval=0.3, max_interval=0.3, fraction=0)
    async with client_for(server, poll=every_300_ms) as client:
        for seed in range(3):
            assert (await client.run(request(server.base_url, seed))).ok
        assert client.stats.aimed_polls == 0
        forecast = client.forecast.seconds()
        assert forecast is not None and 0.4 <= forecast < 0.5
        calls_before = server.state.counters.status_calls
        result = await client.run(request(server.base_url, 3))
    assert result.ok and result.status_calls == 2  # 0.3 s, then the forecast's 0.4 s
    assert server.state.counters.status_calls - calls_before == 2
    assert (client.stats.aimed_polls, client.stats.aimed_hits) == (1, 1)
