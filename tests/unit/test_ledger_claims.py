"""The claim rule on its own: what a row's attempts so far allow the next claim to do.

The ledger applying it, on both backends and across processes, is in
tests/integration/test_ledger_claims.py."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from flux2_pipeline.ledger import (
    AccountRefusal,
    ClaimAction,
    Submission,
    SubmissionState,
    decide,
)
from flux2_pipeline.ledger.claims import AccountState

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


REFUSAL = AccountRefusal("no balance", NOW, NOW + timedelta(minutes=10))


@pytest.mark.parametrize(
    ("account", "price", "expected"),
    [
        (AccountState(), 5.0, ClaimAction.SUBMIT),
        (AccountState(spent_usd=9.9, budget_usd=10.0), 0.1, ClaimAction.SUBMIT),
        (AccountState(spent_usd=9.9, budget_usd=10.0), 0.2, ClaimAction.OVER_BUDGET),
        (AccountState(open_slots=2, concurrency=2), 0.0, ClaimAction.WAIT_FOR_SLOT),
        (AccountState(open_slots=1, concurrency=2), 0.0, ClaimAction.SUBMIT),
        (AccountState(refusal=REFUSAL, budget_usd=10.0), 0.0, ClaimAction.ACCOUNT_REFUSED),
        # A refusal outranks a full account, and a full account outranks the budget.
        (
            AccountState(refusal=REFUSAL, open_slots=1, concurrency=1),
            0.0,
            ClaimAction.ACCOUNT_REFUSED,
        ),
        (
            AccountState(open_slots=1, concurrency=1, spent_usd=10.0, budget_usd=10.0),
            1.0,
            ClaimAction.WAIT_FOR_SLOT,
        ),
    ],
)
def test_the_account_admits_a_row_within_its_refusal_slots_and_budget(
    account: AccountState, price: float, expected: ClaimAction
) -> None:
    assert account.admits(price) is expected


def test_a_reserved_row_spends_its_price_and_takes_a_slot() -> None:
    account = AccountState(spent_usd=1.0, budget_usd=2.0, concurrency=2)
    assert account.accounted and not AccountState().accounted
    account.reserve(0.5)
    assert (account.spent_usd, account.open_slots) == (1.5, 1)
    account.reserve(0.5)
    assert account.admits(0.0) is ClaimAction.WAIT_FOR_SLOT
