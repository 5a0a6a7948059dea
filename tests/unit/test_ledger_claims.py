"""The claim rule on its own: what a row's attempts so far allow the next claim to do.

The ledger applying it, on both backends and across processes, is in
tests/integration/test_ledger_claims.py."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from flux2_pipeline.ledger import (
    ClaimAction,
    Submission,
    SubmissionState,
    decide,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _attempt(number: int, state: SubmissionState, **fields: object) -> Submission:
    base = Submission(
        id=number,
        row_key="k",
        partition="p",
        row_id="r",
        request_hash="h",
        attempt=number,
        state=state,
        request_id=None,
        intent_at=NOW,
        submitted_at=None,
        finished_at=None,
        error=None,
        cost_usd=None,
        output_urls=(),
        updated_at=NOW,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


LIVE = NOW + timedelta(seconds=30)
LAPSED = NOW - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("attempts", "expected", "dangling"),
    [
        ([], ClaimAction.SUBMIT, False),
        (
            [_attempt(1, SubmissionState.COMPLETED, request_id="j1", output_urls=("u",))],
            ClaimAction.REUSE,
            False,
        ),
        ([_attempt(1, SubmissionState.SUBMITTED, request_id="j1")], ClaimAction.FOLLOW, False),
        (
            [_attempt(1, SubmissionState.INTENT, holder="B", lease_until=LIVE)],
            ClaimAction.WAIT,
            False,
        ),
        (
            [_attempt(1, SubmissionState.INTENT, holder="B", lease_until=LAPSED)],
            ClaimAction.SUBMIT,
            True,
        ),
        ([_attempt(1, SubmissionState.UNKNOWN, error="read timeout")], ClaimAction.SUBMIT, True),
        ([_attempt(1, SubmissionState.FAILED, request_id="j1")], ClaimAction.SUBMIT, False),
        ([_attempt(1, SubmissionState.REJECTED, error="422")], ClaimAction.SUBMIT, False),
        (
            [_attempt(n, SubmissionState.FAILED, request_id=f"j{n}") for n in (1, 2, 3)],
            ClaimAction.EXHAUSTED,
            False,
        ),
    ],
    ids=[
        "new",
        "completed",
        "submitted",
        "live-intent",
        "lapsed-intent",
        "unknown",
        "failed",
        "rejected",
        "capped",
    ],
)
def test_decide_covers_every_history(
    attempts: list[Submission], expected: ClaimAction, dangling: bool
) -> None:
    verdict = decide(attempts, holder="A", now=NOW, max_attempts=3)
    assert verdict.action is expected
    assert (verdict.dangling is not None) is dangling


def test_exhausted_keeps_the_last_real_error() -> None:
    attempts = [
        _attempt(1, SubmissionState.FAILED, request_id="j1", error="IMAGE_FETCH_FAILED: 404"),
        _attempt(2, SubmissionState.REJECTED),
    ]
    verdict = decide(attempts, holder="A", now=NOW, max_attempts=1)
    assert verdict.action is ClaimAction.EXHAUSTED
    assert verdict.last_error == "IMAGE_FETCH_FAILED: 404"
