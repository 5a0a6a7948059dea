"""The retry policy and the poll schedule as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from flux2_pipeline.runcomfy import (
    AuthenticationError,
    PollSchedule,
    RateLimitError,
    RetryPolicy,
    ServerError,
    SubmissionOutcomeUnknown,
    TransportError,
)
from flux2_pipeline.runcomfy.errors import (
    SUBMIT_NO_JOB_STATUS_CODES,
    RunComfyError,
    error_for_response,
    submit_error_proves_no_job,
)
from flux2_pipeline.runcomfy.retry import backoff_ceiling, is_retryable, parse_retry_after


def server_error(status: int, code: str | None = "UPSTREAM") -> ServerError:
    return ServerError("boom", status_code=status, error_code=code)


@pytest.mark.parametrize(
    ("error", "for_reads", "for_submit"),
    [
        (TransportError("refused", sent=False), True, True),
        (TransportError("read timeout", sent=True), True, False),
        (SubmissionOutcomeUnknown("lost"), False, False),
        (RateLimitError("slow down", status_code=429), True, True),
        (server_error(503), True, False),
        (RateLimitError("slow down", status_code=429, retry_after=2.0), True, True),
        (server_error(503, code=None), True, False),
        (server_error(500), True, False),
        (server_error(502), True, False),
        (server_error(504), True, False),
        (server_error(408), True, False),
        (server_error(501), False, False),
        (AuthenticationError("no", status_code=401), False, False),
        (error_for_response(402, {}), False, False),
        (error_for_response(404, {}), False, False),
        (error_for_response(422, {}), False, False),
        (error_for_response(400, {}), False, False),
    ],
)
def test_what_is_retryable(error: RunComfyError, for_reads: bool, for_submit: bool) -> None:
    assert is_retryable(error, submit=False) is for_reads
    assert is_retryable(error, submit=True) is for_submit


PROVES_NO_JOB = {400, 401, 402, 403, 404, 422, 429}


@pytest.mark.parametrize("status", range(100, 600))
def test_which_submit_answers_prove_no_job(status: int) -> None:
    # Only these statuses: every other status may hide a created job.
    assert submit_error_proves_no_job(status) is (status in PROVES_NO_JOB)


def test_the_no_job_statuses_are_the_documented_constant() -> None:
    assert SUBMIT_NO_JOB_STATUS_CODES == PROVES_NO_JOB


def test_backoff_grows_exponentially_to_the_cap() -> None:
    assert [backoff_ceiling(n, 0.5, 4.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    assert policy.delay(2, None, rng=lambda: 0.0) == 0.0
    assert policy.delay(2, None, rng=lambda: 0.999) == pytest.approx(3.996)


def test_retry_after_wins_and_is_capped() -> None:
    policy = RetryPolicy(max_retry_after=30.0)
    assert policy.delay(5, 2.0, rng=lambda: 0.0) == 2.0
    assert policy.delay(0, 2.0, rng=lambda: 1.0) == pytest.approx(2.2)
    assert policy.delay(0, 600.0, rng=lambda: 0.0) == 30.0


def test_attempt_budget() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.allows_another(n) for n in (1, 2, 3)] == [True, True, False]


def test_parse_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0.0
    assert parse_retry_after("-4") == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk) is None


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (400, {"error_code": "BAD", "error_message": "m"}, "BadRequestError", "BAD"),
        (401, {"error_code": "UNAUTHORIZED", "error_message": "m"}, "AuthenticationError", None),
        (403, {}, "AuthenticationError", None),
        (402, {"error_code": "INSUFFICIENT_CREDIT"}, "InsufficientCreditError", None),
        (404, {"error_code": "NOT_FOUND"}, "NotFoundError", None),
        (408, {}, "ServerError", None),
        (
            422,
            {"error_code": "VALIDATION_ERROR", "detail": [{"loc": ["body", "prompt"]}]},
            "RequestRejectedError",
            None,
        ),
        (429, {"error_code": "RATE_LIMITED"}, "RateLimitError", None),
        (500, "<html>oops</html>", "ServerError", None),
        (503, {"error_code": "OVERLOADED"}, "ServerError", None),
        (
            200,
            {"error_code": "INSUFFICIENT_CREDIT", "error_message": "m"},
            "InsufficientCreditError",
            None,
        ),
        (200, {"error_code": "RATE_LIMITED"}, "RateLimitError", None),
        (200, {"error_code": "SOMETHING_NEW"}, "BadRequestError", None),
    ],
)
def test_every_error_mapping(status: int, body: object, cls: str, code: str | None) -> None:
    error = error_for_response(status, body, request_id="req-1", retry_after=1.5)
    assert type(error).__name__ == cls
    assert error.status_code == status
    assert error.request_id == "req-1"
    assert error.retry_after == 1.5
    if isinstance(body, dict) and "error_code" in body:
        assert error.error_code == body["error_code"]
    if status == 422:
        assert error.detail == [{"loc": ["body", "prompt"]}]
    assert str(status) in str(error)


def test_poll_schedule_adapts() -> None:
    schedule = PollSchedule(min_interval=0.1, max_interval=5.0, fraction=0.15)
    assert schedule.interval(0) == 0.1
    assert schedule.interval(10) == pytest.approx(1.5)
    assert schedule.interval(1000) == 5.0
    assert schedule.calls_needed(0.5) == 5
    # A long job costs a logarithmic number of calls, not duration / min_interval.
    assert schedule.calls_needed(60) <= 60 / 0.1 / 10
    with pytest.raises(ValueError):
        PollSchedule(min_interval=0)
