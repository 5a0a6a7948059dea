"""Every body of `tests/fixtures/runcomfy_bodies.json`, answered to the client at its endpoint.

The fixture names the source of each body (RunComfy's CLI, MCP server, ComfyUI nodes and
error-code page); here each one goes through `httpx.MockTransport` to the client call of
its endpoint, and what the client makes of it is stated by name, once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux2_pipeline.runcomfy import (
    AsyncRunComfyClient,
    AuthenticationError,
    BadRequestError,
    EditRequest,
    InsufficientCreditError,
    JobState,
    MalformedResponseError,
    NotFoundError,
    RequestRejectedError,
    ResultNotReadyError,
    RetryPolicy,
    ServerError,
    SubmissionOutcomeUnknown,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runcomfy_bodies.json"
BODIES = {entry["name"]: entry for entry in json.loads(FIXTURE.read_text())["bodies"]}
TOKEN = "tok-fixture-3b9e"
REQ = EditRequest(prompt="p", image_urls=("https://img.test/a.png",))

# What the client makes of each body: a class it raises, or a check of what it returns.
EXPECTED: dict[str, Any] = {
    "submit_accepted": lambda handle: handle.request_id == "r1",
    "submit_accepted_200_request_id_only": lambda handle: handle.request_id == "v1",
    "submit_insufficient_resources": InsufficientCreditError,
    "submit_insufficient_resources_http_200": InsufficientCreditError,
    "submit_user_account_error": AuthenticationError,
    "submit_validation_error": RequestRejectedError,
    "submit_bad_model_id": BadRequestError,
    "submit_permission_denied": AuthenticationError,
    "submit_internal_error": SubmissionOutcomeUnknown,
    "status_failed_string_error": lambda s: (
        (s.state, s.error) == (JobState.FAILED, "Model run failed")
    ),
    "status_failed_object_error": lambda s: s.state is JobState.FAILED and "500001" in s.error,
    "status_failed_list_error": lambda s: (
        s.state is JobState.FAILED and s.error.startswith("failed to load image from")
    ),
    "status_in_progress": lambda s: s.state is JobState.IN_PROGRESS,
    "status_in_queue_with_position": lambda s: (
        (s.state, s.queue_position) == (JobState.IN_QUEUE, 3)
    ),
    "status_in_progress_with_instance": lambda s: s.state is JobState.IN_PROGRESS,
    "status_succeeded": lambda s: s.state is JobState.COMPLETED,
    "status_completed": lambda s: s.state is JobState.COMPLETED,
    "status_canceled": lambda s: s.state is JobState.CANCELLED,
    "status_cancelled": lambda s: s.state is JobState.CANCELLED,
    "status_pending": lambda s: s.state is JobState.IN_QUEUE,
    "status_waiting": lambda s: s.state is JobState.IN_QUEUE,
    "status_starting": lambda s: s.state is JobState.IN_PROGRESS,
    "status_processing": lambda s: s.state is JobState.IN_PROGRESS,
    "status_queued": lambda s: s.state is JobState.IN_QUEUE,
    "poll_error_http_200": ServerError,
    "status_request_not_found": NotFoundError,
    "result_completed": lambda r: r.ok and r.output_urls,
    "result_succeeded_with_cost": lambda r: r.ok and r.cost_usd is not None,
    "result_not_ready": ResultNotReadyError,
    "result_error_http_200": ServerError,
    "result_request_not_found": NotFoundError,
    "cancel_canceled": lambda c: c.cancelled and c.state is JobState.CANCELLED,
    "cancel_cancelled": lambda c: c.cancelled and c.state is JobState.CANCELLED,
    "cancel_not_cancellable": lambda c: not c.cancelled,
    "model": lambda price: price.price_usd == 0.04 and price.unit == "image",
    "balance": lambda balance: balance.usd == 5.0,
    "balance_zero": lambda balance: balance.usd == 0.0,
    "balance_negative": lambda balance: balance.usd == -1.0,
    "balance_denied_http_200": AuthenticationError,
    "balance_unauthorized_no_code": AuthenticationError,
    "balance_empty_object": MalformedResponseError,
}


def test_every_fixture_body_has_an_expectation_and_a_source() -> None:
    assert set(EXPECTED) == set(BODIES)
    assert all(entry["source"] for entry in BODIES.values())


async def _call(client: AsyncRunComfyClient, endpoint: str) -> Any:
    if endpoint == "submit":
        return await client.submit(REQ)
    if endpoint == "status":
        return await client.status("r1")
    if endpoint == "result":
        return await client.result("r1")
    if endpoint == "cancel":
        return await client.cancel("r1")
    if endpoint == "model":
        return await client.model_price()
    assert endpoint == "balance"
    return await client.balance()


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_the_client_reads_each_body_as_stated(name: str) -> None:
    entry = BODIES[name]
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(entry["http_status"], json=entry["body"])

    client = AsyncRunComfyClient(
        TOKEN,
        "https://model-api.test",
        account_base_url="https://account-api.test",
        transport=httpx.MockTransport(answer),
        retry=RetryPolicy(max_attempts=1),
    )
    expected = EXPECTED[name]
    async with client:
        if isinstance(expected, type):
            with pytest.raises(expected) as caught:
                await _call(client, entry["endpoint"])
            assert TOKEN not in str(caught.value)
        else:
            assert expected(await _call(client, entry["endpoint"])), entry
    assert len(seen) == 1  # a paid submit is never retried, and no call is made twice
