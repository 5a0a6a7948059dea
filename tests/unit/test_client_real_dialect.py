"""The client against bodies shaped as RunComfy's own clients and docs show them.

Every body below names where its shape comes from. They go through `httpx.MockTransport`:
every state spelling, every error body at every endpoint, and each code's class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from flux2_pipeline.runcomfy import (
    AccountRefusedError,
    AsyncRunComfyClient,
    AuthenticationError,
    BadRequestError,
    EditRequest,
    InsufficientCreditError,
    JobState,
    NotFoundError,
    PollSchedule,
    RateLimitError,
    RequestRejectedError,
    ResultNotReadyError,
    RetryPolicy,
    ServerError,
    SubmissionOutcomeUnknown,
    failure_blames_input,
    is_account_refusal,
)
from flux2_pipeline.runcomfy.errors import error_for_response, submit_error_proves_no_job

TOKEN = "sk-dialect-5b1e0c7a9d"
BASE = "https://model-api.test"
ACCOUNT = "https://account-api.test"
MODEL = "/v1/models/blackforestlabs/flux-2/dev/edit"
REQ = EditRequest(prompt="make it snow", image_urls=("https://img.test/a.png",))

ZAPIER = "runcomfy-com/runcomfy-mcp integrations/zapier/test/integration.test.js"
MCP = "runcomfy-com/runcomfy-mcp runcomfy_client.py"
CLI_POLL = "runcomfy-com/runcomfy-cli src/poll.rs"
NODES = "runcomfy-com/comfyui-runcomfy-partner-nodes runcomfy/execution.py"
DOCS = "docs.runcomfy.com model-apis/error-codes"

# (source, HTTP status, body, the class it must become)
ERROR_BODIES: list[tuple[str, int, dict[str, Any], type[Exception]]] = [
    (ZAPIER, 400, {"error_code": 400005}, ResultNotReadyError),
    (
        ZAPIER,
        200,
        {"error_code": 403003, "error_message": "token not allowed"},
        AuthenticationError,
    ),
    (MCP, 200, {"error_code": 500001, "error_message": "internal"}, ServerError),
    (DOCS, 400, {"error_code": 400001, "error_message": "bad model id"}, BadRequestError),
    (
        DOCS,
        400,
        {"error_code": 400002, "error_message": "Insufficient resources"},
        InsufficientCreditError,
    ),
    (
        DOCS,
        200,
        {"error_code": 400002, "error_message": "Insufficient resources"},
        InsufficientCreditError,
    ),
    (DOCS, 400, {"error_code": 400004, "error_message": "user account error"}, AuthenticationError),
    (DOCS, 403, {"error_code": 403001, "error_message": "permission denied"}, AuthenticationError),
    (DOCS, 404, {"error_code": 404001, "error_message": "request id expired"}, NotFoundError),
    (
        DOCS,
        422,
        {"error_code": 422001, "error_message": "validation", "detail": [{"loc": ["x"]}]},
        RequestRejectedError,
    ),
    (DOCS, 200, {"error_code": "422001", "error_message": "validation"}, RequestRejectedError),
    (DOCS, 429, {"error_code": 429001, "error_message": "slow down"}, RateLimitError),
    (ZAPIER, 401, {"error_message": "token"}, AuthenticationError),
]


@pytest.mark.parametrize(("source", "status", "body", "cls"), ERROR_BODIES)
def test_each_error_body_becomes_its_class(
    source: str, status: int, body: dict[str, Any], cls: type[Exception]
) -> None:
    error = error_for_response(status, body)
    assert type(error) is cls, source
    account = cls in (AuthenticationError, InsufficientCreditError)
    assert is_account_refusal(error) is account
    assert isinstance(error, AccountRefusedError) is account


@pytest.mark.parametrize(
    ("status", "code", "no_job"),
    [
        (400, 400002, True),
        (200, 400002, True),
        (200, 400004, True),
        (200, 401001, True),
        (200, 403003, True),
        (200, 404001, True),
        (200, 422001, True),
        (200, 429001, True),
        (200, 500001, False),
        (500, 500001, False),
        (400, 500001, False),  # the code's family decides, not the status
        (502, None, False),
        (200, None, False),
        (422, None, True),
    ],
)
def test_what_a_submit_answer_proves(status: int, code: int | None, no_job: bool) -> None:
    assert submit_error_proves_no_job(status, code) is no_job


class DialectApi:
    """Answers as the real service does; per-path scripted answers first."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.scripts: dict[str, list[httpx.Response]] = {}
        self.hosts: set[str] = set()

    def script(self, path: str, *answers: httpx.Response) -> None:
        self.scripts.setdefault(path, []).extend(answers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls[path] += 1
        self.hosts.add(request.url.host)
        queue = self.scripts.get(path)
        if queue:
            return queue.pop(0) if len(queue) > 1 else queue[0]
        if path == MODEL and request.method == "POST":  # ZAPIER: 202 {request_id, status}
            return httpx.Response(202, json={"request_id": "r1", "status": "in_queue"})
        if path.endswith("/status"):
            return httpx.Response(200, json={"request_id": "r1", "status": "succeeded"})
        if path.endswith("/result"):  # NODES: succeeded, images, cost
            return httpx.Response(
                200,
                json={
                    "request_id": "r1",
                    "status": "succeeded",
                    "output": {"images": ["https://cdn.test/r1/0.png"]},
                    "cost": 0.03,
                },
            )
        return httpx.Response(404, json={"error_code": 404001, "error_message": "no such"})


def client_for(
    api: Callable[[httpx.Request], httpx.Response], **options: Any
) -> AsyncRunComfyClient:
    return AsyncRunComfyClient(
        TOKEN,
        BASE,
        account_base_url=ACCOUNT,
        transport=httpx.MockTransport(api),
        **options,
        retry=RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002),
        poll=PollSchedule(min_interval=0.001, max_interval=0.005, fraction=0),
    )


def status(state: str, **extra: Any) -> httpx.Response:
    return httpx.Response(200, json={"request_id": "r1", "status": state, **extra})


async def test_a_job_that_succeeded_completes_with_its_cost() -> None:
    api = DialectApi()
    async with client_for(api) as client:
        result = await client.run(REQ)
    assert result.ok and result.state is JobState.COMPLETED
    assert result.output_urls == ("https://cdn.test/r1/0.png",)
    assert result.cost_usd == pytest.approx(0.03)


@pytest.mark.parametrize("waiting", ["pending", "waiting", "queued", "starting", "processing"])
async def test_every_waiting_word_keeps_polling(waiting: str) -> None:  # NODES, CLI_POLL
    api = DialectApi()
    api.script("/v1/requests/r1/status", status(waiting), status(waiting), status("succeeded"))
    async with client_for(api) as client:
        result = await client.run(REQ)
    assert result.ok
    assert api.calls["/v1/requests/r1/status"] == 3


async def test_not_ready_results_and_http_200_errors_poll_on() -> None:
    api = DialectApi()
    error_200 = httpx.Response(200, json={"error_code": 500001, "error_message": "internal"})
    not_ready = httpx.Response(400, json={"error_code": 400005})
    api.script("/v1/requests/r1/status", error_200, error_200, error_200, status("completed"))
    api.script("/v1/requests/r1/result", not_ready, not_ready)
    api.scripts["/v1/requests/r1/result"].append(
        httpx.Response(
            200,
            json={
                "request_id": "r1",
                "status": "succeeded",
                "output": {"image": "https://c/1.png"},
            },
        )
    )
    async with client_for(api) as client:
        result = await client.run(REQ)
        assert client.stats.not_ready_results == 2
        assert client.stats.transient_poll_errors >= 1
    assert result.ok and result.output_urls == ("https://c/1.png",)


async def test_a_failed_status_with_its_error_ends_the_job_when_the_result_lags() -> None:
    # ZAPIER: a /status of failed with a top-level error; /result not ready for a while.
    api = DialectApi()
    api.script("/v1/requests/r1/status", status("failed", error="Model run failed"))
    api.script("/v1/requests/r1/result", httpx.Response(400, json={"error_code": 400005}))
    async with client_for(api, result_lag_grace=0.02) as client:
        result = await client.run(REQ)
    assert result.state is JobState.FAILED and not result.ok
    assert result.error == "Model run failed"


@pytest.mark.parametrize(
    ("error", "text", "blames_input"),
    [
        ("Model run failed", "Model run failed", False),
        (
            {"error_code": 422001, "error_message": "image_urls[0]: cannot identify image"},
            "422001: image_urls[0]: cannot identify image",
            True,
        ),
        (
            ["Failed to load image from https://x.test/a.png", {"message": "HTTP 403"}],
            "Failed to load image from https://x.test/a.png; HTTP 403",
            True,
        ),
        (
            {"error_code": 500001, "error_message": "internal error"},
            "500001: internal error",
            False,
        ),
    ],
)
async def test_a_failed_jobs_error_in_any_shape(error: Any, text: str, blames_input: bool) -> None:
    api = DialectApi()
    api.script("/v1/requests/r1/status", status("failed"))
    api.script(
        "/v1/requests/r1/result",
        httpx.Response(200, json={"request_id": "r1", "status": "failed", "error": error}),
    )
    async with client_for(api) as client:
        result = await client.run(REQ)
    assert result.error == text
    assert failure_blames_input(result.error) is blames_input


async def test_a_canceled_job_is_cancelled() -> None:
    api = DialectApi()
    api.script("/v1/requests/r1/status", status("canceled"))
    api.script("/v1/requests/r1/result", status("canceled"))
    api.script(
        "/v1/requests/r1/cancel",
        httpx.Response(
            200, json={"request_id": "r1", "status": "canceled", "outcome": "cancelled"}
        ),
    )
    async with client_for(api) as client:
        result = await client.run(REQ)
        outcome = await client.cancel("r1")
    assert result.state is JobState.CANCELLED
    assert outcome.cancelled and outcome.state is JobState.CANCELLED


@pytest.mark.parametrize("http_status", [400, 200])
async def test_no_balance_on_submit_is_an_account_refusal_that_proves_no_job(
    http_status: int,
) -> None:
    api = DialectApi()
    api.script(
        MODEL,
        httpx.Response(
            http_status, json={"error_code": 400002, "error_message": "Insufficient resources"}
        ),
    )
    async with client_for(api) as client:
        with pytest.raises(InsufficientCreditError) as caught:
            await client.submit(REQ)
    assert caught.value.action.startswith("account balance too low (400002)")
    assert api.calls[MODEL] == 1  # refused, so never retried


async def test_a_5xx_family_code_on_submit_leaves_the_outcome_unknown() -> None:
    api = DialectApi()
    api.script(MODEL, httpx.Response(200, json={"error_code": 500001, "error_message": "x"}))
    async with client_for(api) as client:
        with pytest.raises(SubmissionOutcomeUnknown):
            await client.submit(REQ)
    assert api.calls[MODEL] == 1


async def test_the_models_price_and_the_accounts_balance() -> None:
    api = DialectApi()
    # ZAPIER: the model route and the balance route, on two hosts.
    api.script(
        MODEL,
        httpx.Response(
            200,
            json={
                "model_id": "blackforestlabs/flux-2/dev/edit",
                "base_price_usd": 0.04,
                "price_unit": "image",
                "input_schema": {"type": "object"},
            },
        ),
    )
    api.script(
        "/prod/v2/balance",
        httpx.Response(200, json={"balance_usd": 0, "balance_microdollars": 0, "currency": "USD"}),
    )
    async with client_for(api) as client:
        price = await client.model_price()
        balance = await client.balance()
    assert (price.price_usd, price.unit) == (0.04, "image")
    assert balance.usd == 0.0
    assert api.hosts == {"model-api.test", "account-api.test"}


async def test_a_negative_balance_and_an_http_200_refusal_on_the_balance_route() -> None:
    api = DialectApi()
    api.script(
        "/prod/v2/balance",
        httpx.Response(200, json={"balance_usd": -1, "balance_microdollars": -1000000}),
        httpx.Response(200, json={"error_code": 403003, "error_message": TOKEN}),
    )
    async with client_for(api) as client:
        assert (await client.balance()).usd == -1.0
        with pytest.raises(AuthenticationError) as caught:
            await client.balance()
    # The service echoed the token in its message: it must not travel in our words.
    assert caught.value.action.startswith("token not allowed (403003)")
    assert TOKEN not in str(caught.value) and TOKEN not in repr(caught.value.args)


def test_the_remote_schedule_keeps_a_20_s_job_to_about_ten_status_calls() -> None:
    remote = PollSchedule.for_base_url("https://model-api.runcomfy.net")
    assert remote.interval(0.0) >= 1.0
    assert remote.calls_needed(20.0) <= 10
    local = PollSchedule.for_base_url("http://127.0.0.1:8188")
    assert local.interval(0.0) < remote.interval(0.0)


@pytest.mark.parametrize(
    ("base", "account"),
    [
        ("http://127.0.0.1:8188", "http://127.0.0.1:8188"),
        ("http://localhost:9/", "http://localhost:9"),
        ("http://[::1]:8188", "http://[::1]:8188"),
        ("https://model-api.runcomfy.net", "https://api.runcomfy.net"),
    ],
)
async def test_an_emulator_on_loopback_serves_the_balance_too(base: str, account: str) -> None:
    # A local setup must never reach out to the real account API for its balance.
    async with AsyncRunComfyClient(None, base) as client:
        assert client.account_base_url == account
