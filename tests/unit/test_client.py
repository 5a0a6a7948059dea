"""The client against `httpx.MockTransport`: retries, unknown outcomes, polling, secrets."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from flux2_pipeline.runcomfy import (
    AsyncRunComfyClient,
    AuthenticationError,
    EditRequest,
    InsufficientCreditError,
    JobDeadlineExceeded,
    JobLostError,
    JobState,
    NotFoundError,
    PollSchedule,
    RateLimitError,
    RetryPolicy,
    ServerError,
    SubmissionOutcomeUnknown,
    TransportError,
)

TOKEN = "sk-test-7f3a9c1d2e4b6a8f"
BASE = "https://api.test"
REQ = EditRequest(prompt="make it snow", image_urls=("https://img.test/a.png",))
SUBMIT_PATH = "/v1/models/blackforestlabs/flux-2/dev/edit"

Handler = Callable[[httpx.Request], httpx.Response]


def make_client(handler: Handler, **kwargs: Any) -> AsyncRunComfyClient:
    kwargs.setdefault("retry", RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.002))
    kwargs.setdefault("poll", PollSchedule(min_interval=0.001, max_interval=0.005, fraction=0))
    return AsyncRunComfyClient(TOKEN, BASE, transport=httpx.MockTransport(handler), **kwargs)


def submitted(request_id: str = "job-1") -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "request_id": request_id,
            "status_url": f"{BASE}/v1/requests/{request_id}/status",
            "result_url": f"{BASE}/v1/requests/{request_id}/result",
            "cancel_url": f"{BASE}/v1/requests/{request_id}/cancel",
        },
    )


class FakeApi:
    """A scripted API: per-path queues of responses, then a default."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.scripts: dict[str, list[Callable[[httpx.Request], httpx.Response]]] = {}
        self.states = ["in_queue", "in_progress", "completed"]
        self.seen_auth: set[str] = set()

    def script(self, path: str, *responses: Callable[[httpx.Request], httpx.Response]) -> None:
        self.scripts.setdefault(path, []).extend(responses)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls[path] += 1
        self.seen_auth.add(request.headers.get("Authorization", ""))
        queue = self.scripts.get(path)
        if queue:
            return queue.pop(0)(request)
        if path == SUBMIT_PATH:
            return submitted()
        if path.endswith("/status"):
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return httpx.Response(200, json={"request_id": "job-1", "status": state})
        if path.endswith("/result"):
            assert request.url.params.get("include_cost") == "true"
            return httpx.Response(
                200,
                json={
                    "request_id": "job-1",
                    "status": "completed",
                    "output": {"images": ["https://cdn.test/o/0.png"]},
                    "error": None,
                    "created_at": "2026-11-24T00:00:00Z",
                    "finished_at": "2026-11-24T00:00:05Z",
                    "cost_usd": 0.025,
                    "brand_new_field": {"x": 1},
                },
            )
        if path.endswith("/cancel"):
            return httpx.Response(
                200, json={"request_id": "job-1", "status": "cancelled", "outcome": "cancelled"}
            )
        return httpx.Response(404, json={"error_code": "NOT_FOUND", "error_message": "no route"})


def respond(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    def handler(_: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raise_(exc: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("simulated", request=request)

    return handler


async def test_run_submits_polls_and_returns_the_result() -> None:
    api = FakeApi()
    async with make_client(api) as client:
        result = await client.run(REQ)
    assert result.ok
    assert result.state is JobState.COMPLETED
    assert result.output_urls == ("https://cdn.test/o/0.png",)
    assert result.cost_usd == 0.025
    assert result.status_calls == 3
    assert result.submitted_at is not None
    assert api.calls[SUBMIT_PATH] == 1
    assert api.seen_auth == {f"Bearer {TOKEN}"}


async def test_submit_handle_carries_the_api_urls() -> None:
    async with make_client(FakeApi()) as client:
        handle = await client.submit(REQ)
    assert handle.request_id == "job-1"
    assert handle.cancel_url == f"{BASE}/v1/requests/job-1/cancel"


@pytest.mark.parametrize(
    "first",
    [
        respond(429, {"error_code": "RATE_LIMITED", "error_message": "slow"}, {"Retry-After": "0"}),
        raise_(httpx.ConnectError),
        raise_(httpx.ConnectTimeout),
        raise_(httpx.PoolTimeout),
    ],
    ids=["429", "connect-refused", "connect-timeout", "pool-timeout"],
)
async def test_submit_is_retried_only_when_no_job_can_exist(first: Handler) -> None:
    api = FakeApi()
    api.script(SUBMIT_PATH, first)
    async with make_client(api) as client:
        handle = await client.submit(REQ)
        assert client.stats.retries == 1
    assert handle.request_id == "job-1"
    assert api.calls[SUBMIT_PATH] == 2


@pytest.mark.parametrize(
    ("first", "status_code"),
    [
        (raise_(httpx.ReadTimeout), None),
        (raise_(httpx.RemoteProtocolError), None),
        (raise_(httpx.ReadError), None),
        (raise_(httpx.WriteTimeout), None),
        (raise_(httpx.WriteError), None),
        (respond(502, "<html>bad gateway</html>"), 502),
        (respond(502, {"error_code": "BAD_GATEWAY", "error_message": "upstream"}), 502),
        (respond(504, "<html>gateway timeout</html>"), 504),
        (respond(503, "upstream unavailable"), 503),
        (respond(503, {"error_code": "OVERLOADED", "error_message": "busy"}), 503),
        (respond(500, {"error_code": "INTERNAL", "error_message": "x"}), 500),
        (respond(408, {"error_code": "TIMEOUT", "error_message": "slow"}), 408),
        (respond(408, ""), 408),
        (respond(409, {"error_code": "CONFLICT", "error_message": "busy"}), 409),
        (respond(200, {"status_url": "s"}), 200),
        (respond(201, {"status_url": "s"}), 201),
        (respond(200, {"request_id": ""}), 200),
        (respond(200, {"request_id": 12345}), 200),
        (respond(200, {"request_id": "a b\nc"}), 200),
        (respond(200, "<html>ok</html>"), 200),
        (respond(200, [1, 2]), 200),
        (respond(202, None), 202),
        (respond(200, {"error_code": "INSUFFICIENT_CREDIT", "error_message": "no"}), 200),
        (respond(302, {"request_id": "job-9"}, {"Location": "/elsewhere"}), 302),
    ],
    ids=[
        "read-timeout",
        "dropped",
        "read-error",
        "write-timeout",
        "write-error",
        "502-html",
        "502-with-body",
        "504",
        "503-no-body",
        "503-with-body",
        "500-with-body",
        "408-with-body",
        "408-empty",
        "409",
        "200-no-request-id",
        "201-no-request-id",
        "200-empty-request-id",
        "200-numeric-request-id",
        "200-request-id-with-newline",
        "200-not-json",
        "200-json-list",
        "202-null",
        "200-with-error-code",
        "302",
    ],
)
async def test_submit_answer_without_proof_of_no_job_is_outcome_unknown(
    first: Handler, status_code: int | None
) -> None:
    api = FakeApi()
    api.script(SUBMIT_PATH, first)
    async with make_client(api) as client:
        with pytest.raises(SubmissionOutcomeUnknown) as caught:
            await client.submit(REQ)
        assert client.stats.retries == 0
    assert api.calls[SUBMIT_PATH] == 1
    assert caught.value.status_code == status_code
    assert "may have created a job" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, {"error_code": "BAD_REQUEST", "error_message": "nope"}, "BadRequestError"),
        (401, {"error_code": "UNAUTHORIZED", "error_message": "bad token"}, "AuthenticationError"),
        (
            402,
            {"error_code": "INSUFFICIENT_CREDIT", "error_message": "top up"},
            "InsufficientCreditError",
        ),
        (403, {"error_code": "FORBIDDEN", "error_message": "no"}, "AuthenticationError"),
        (404, {"error_code": "NOT_FOUND", "error_message": "?"}, "NotFoundError"),
        (
            422,
            {"error_code": "VALIDATION_ERROR", "error_message": "bad", "detail": []},
            "RequestRejectedError",
        ),
        (404, {"error_message": "no route"}, "NotFoundError"),
        (422, {"detail": [{"loc": ["body", "prompt"], "msg": "bad"}]}, "RequestRejectedError"),
        (401, "", "AuthenticationError"),
    ],
)
async def test_answers_proving_no_job_raise_the_typed_error_once(
    status: int, body: dict[str, Any], cls: str
) -> None:
    api = FakeApi()
    api.script(SUBMIT_PATH, respond(status, body))
    async with make_client(api) as client:
        with pytest.raises(Exception) as caught:
            await client.submit(REQ)
    assert type(caught.value).__name__ == cls
    assert caught.value.status_code == status  # type: ignore[attr-defined]
    expected_code = body.get("error_code") if isinstance(body, dict) else None
    assert caught.value.error_code == expected_code  # type: ignore[attr-defined]
    assert not isinstance(caught.value, SubmissionOutcomeUnknown)
    assert api.calls[SUBMIT_PATH] == 1


async def test_submit_gives_up_on_429_after_the_retries_with_a_rate_limit_error() -> None:
    api = FakeApi()
    api.script(SUBMIT_PATH, *[respond(429, {"error_code": "RATE_LIMITED"})] * 4)
    async with make_client(api) as client:
        with pytest.raises(RateLimitError):
            await client.submit(REQ)
    assert api.calls[SUBMIT_PATH] == 4


async def test_http_200_with_error_code_is_an_error_on_reads() -> None:
    api = FakeApi()
    api.script(
        "/v1/requests/job-1/status",
        respond(200, {"error_code": "INSUFFICIENT_CREDIT", "error_message": "no credit left"}),
    )
    async with make_client(api) as client:
        with pytest.raises(InsufficientCreditError, match="no credit left"):
            await client.status("job-1")


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_reads_are_retried_on_transient_answers(status: int) -> None:
    api = FakeApi()
    path = "/v1/requests/job-1/status"
    api.script(path, respond(status, "transient"), raise_(httpx.ReadTimeout))
    async with make_client(api) as client:
        status_now = await client.status("job-1")
    assert status_now.state is JobState.IN_QUEUE
    assert api.calls[path] == 3


async def test_retries_are_bounded() -> None:
    api = FakeApi()
    path = "/v1/requests/job-1/result"
    api.script(path, *[respond(503, {"error_code": "BUSY"})] * 10)
    async with make_client(api) as client:
        with pytest.raises(ServerError):
            await client.result("job-1")
    assert api.calls[path] == 4


async def test_retry_after_is_honoured() -> None:
    api = FakeApi()
    path = "/v1/requests/job-1/status"
    api.script(path, respond(429, {"error_code": "RATE_LIMITED"}, {"Retry-After": "0.2"}))
    loop = asyncio.get_running_loop()
    async with make_client(api) as client:
        started = loop.time()
        await client.status("job-1")
        assert loop.time() - started >= 0.2


async def test_deadline_cancels_the_job_before_raising() -> None:
    api = FakeApi()
    api.states = ["in_queue"]
    async with make_client(api) as client:
        with pytest.raises(JobDeadlineExceeded) as caught:
            await client.run(REQ, deadline=0.05)
    assert caught.value.request_id == "job-1"
    assert api.calls["/v1/requests/job-1/cancel"] == 1


async def test_caller_cancellation_cancels_the_job() -> None:
    api = FakeApi()
    api.states = ["in_queue"]
    async with make_client(api) as client:
        task = asyncio.create_task(client.run(REQ))
        while api.calls["/v1/requests/job-1/status"] < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert api.calls["/v1/requests/job-1/cancel"] == 1


async def test_an_unknown_state_is_polled_to_the_deadline_and_named() -> None:
    # A paid job is never given up for a word the client does not know: it is polled to
    # its deadline, then cancelled, and the error names the state.
    api = FakeApi()
    api.states = ["warming_up"]
    async with make_client(api) as client:
        with pytest.raises(JobDeadlineExceeded, match="warming_up") as caught:
            await client.wait("job-1", deadline=0.1)
    assert api.calls["/v1/requests/job-1/status"] >= 5
    assert api.calls["/v1/requests/job-1/cancel"] == 1
    assert "unknown to this client" in str(caught.value)


async def test_an_unknown_state_that_turns_into_a_known_one_completes() -> None:
    api = FakeApi()
    api.states = ["warming_up", "warming_up", "completed"]
    async with make_client(api) as client:
        result = await client.wait("job-1", deadline=5.0)
    assert result.ok


def not_found(_: httpx.Request) -> httpx.Response:
    return httpx.Response(404, json={"error_code": "NOT_FOUND", "error_message": "no such job"})


def in_progress_result(_: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"request_id": "job-1", "status": "in_progress"})


@pytest.mark.parametrize(
    "result_while_missing",
    [not_found, in_progress_result],
    ids=["result-404-too", "result-knows-it"],
)
async def test_a_transient_404_on_status_is_not_a_lost_job(result_while_missing: Handler) -> None:
    api = FakeApi()
    api.states = ["in_progress", "completed"]
    api.script("/v1/requests/job-1/status", not_found)
    api.script("/v1/requests/job-1/result", result_while_missing)
    async with make_client(api, lost_job_grace=30.0) as client:
        result = await client.run(REQ)
    assert result.ok and result.request_id == "job-1"
    assert api.calls[SUBMIT_PATH] == 1
    # The 404 made the client ask /result once, then the final result once.
    assert api.calls["/v1/requests/job-1/result"] == 2
    assert api.calls["/v1/requests/job-1/cancel"] == 0


async def test_a_transient_404_on_result_is_retried() -> None:
    api = FakeApi()
    api.states = ["completed"]
    api.script("/v1/requests/job-1/result", not_found, not_found)
    async with make_client(api, lost_job_grace=30.0) as client:
        result = await client.wait("job-1")
    assert result.ok
    assert api.calls["/v1/requests/job-1/result"] == 3


async def test_a_job_answering_404_past_the_grace_is_lost() -> None:
    api = FakeApi()
    api.script("/v1/requests/job-1/status", *[not_found] * 10_000)
    api.script("/v1/requests/job-1/result", *[not_found] * 10_000)
    loop = asyncio.get_running_loop()
    async with make_client(api, lost_job_grace=0.05) as client:
        started = loop.time()
        with pytest.raises(JobLostError) as caught:
            await client.wait("job-1")
        waited = loop.time() - started
    assert waited >= 0.05
    assert isinstance(caught.value, NotFoundError) and caught.value.status_code == 404
    assert caught.value.request_id == "job-1"
    assert "no longer knows this job after" in str(caught.value)
    assert api.calls["/v1/requests/job-1/status"] >= 2
    assert api.calls["/v1/requests/job-1/result"] == api.calls["/v1/requests/job-1/status"]


async def test_the_lost_job_grace_defaults_to_the_documented_constant() -> None:
    from flux2_pipeline.runcomfy.client import DEFAULT_LOST_JOB_GRACE

    assert DEFAULT_LOST_JOB_GRACE == 60.0
    async with make_client(FakeApi()) as client:
        assert client.lost_job_grace == DEFAULT_LOST_JOB_GRACE


async def test_the_deadline_still_wins_over_the_lost_job_grace() -> None:
    api = FakeApi()
    api.script("/v1/requests/job-1/status", *[not_found] * 10_000)
    api.script("/v1/requests/job-1/result", *[not_found] * 10_000)
    async with make_client(api, lost_job_grace=30.0) as client:
        with pytest.raises(JobDeadlineExceeded):
            await client.wait("job-1", deadline=0.05)
    assert api.calls["/v1/requests/job-1/cancel"] == 1


async def test_failed_jobs_come_back_as_results() -> None:
    api = FakeApi()
    api.states = ["failed"]
    api.script(
        "/v1/requests/job-1/result",
        respond(
            200,
            {
                "request_id": "job-1",
                "status": "failed",
                "output": None,
                "error": {"error_code": "MODEL_ERROR", "error_message": "bad input image"},
            },
        ),
    )
    async with make_client(api) as client:
        result = await client.run(REQ)
    assert not result.ok
    assert result.state is JobState.FAILED
    assert result.error == "MODEL_ERROR: bad input image"


async def test_token_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    api = FakeApi()
    api.script(SUBMIT_PATH, respond(401, {"error_code": "UNAUTHORIZED", "error_message": "bad"}))
    api.script(
        "/v1/requests/job-1/status", raise_(httpx.ReadTimeout), *[raise_(httpx.ReadTimeout)] * 5
    )
    api.script("/v1/requests/nope/../x/cancel", respond(404, {"error_code": "NOT_FOUND"}))
    client = make_client(api)
    texts = [repr(client), str(client)]
    async with client:
        with pytest.raises(AuthenticationError) as auth:
            await client.submit(REQ)
        with pytest.raises(TransportError) as transport:
            await client.status("job-1")
        with pytest.raises(NotFoundError) as missing:
            await client.cancel("nope/../x")
    for error in (auth.value, transport.value, missing.value):
        texts += [str(error), repr(error), repr(error.__cause__), str(error.__cause__)]
        texts += [repr(vars(error))]
    texts.append(caplog.text)
    assert all(TOKEN not in text for text in texts)
    assert "Bearer" not in caplog.text


async def test_rate_limit_error_carries_retry_after() -> None:
    api = FakeApi()
    api.script(
        "/v1/requests/job-1/cancel",
        *[respond(429, {"error_code": "RATE_LIMITED"}, {"Retry-After": "0.001"})] * 4,
    )
    async with make_client(api) as client:
        with pytest.raises(RateLimitError) as caught:
            await client.cancel("job-1")
    assert caught.value.retry_after == 0.001
