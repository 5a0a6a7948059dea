"""A row's submissions through the ledger, the same on SQLite and on PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from flux2_pipeline.ledger import (
    LOOKUP_CHUNK_SIZE,
    Ledger,
    LedgerStateError,
    RowHistory,
    SubmissionState,
    make_row_key,
)
from tests.helpers.ledger import record_row_intent, selects_sent

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _history(ledger: Ledger, key: str) -> RowHistory:
    return ledger.lookup([key])[key]


# -- lifecycle and history semantics ----------------------------------------------------


def test_full_lifecycle(ledger: Ledger) -> None:
    intent = record_row_intent(ledger)
    assert intent.state is SubmissionState.INTENT
    assert intent.attempt == 1 and intent.request_id is None
    assert intent.intent_at.tzinfo is UTC and intent.output_urls == ()

    history = _history(ledger, intent.row_key)
    assert history.dangling_intent == intent and history.paid_attempts == 1
    assert history.live is None

    local = timezone(timedelta(hours=2))
    submitted = ledger.record_submitted(intent.id, "req-1", T0.astimezone(local))
    assert submitted.state is SubmissionState.SUBMITTED
    assert submitted.submitted_at == T0 and submitted.submitted_at.tzinfo is UTC
    history = _history(ledger, intent.row_key)
    assert history.live == submitted and history.dangling_intent is None
    assert history.completed is None

    done = ledger.record_finished(
        intent.id,
        "completed",
        T0 + timedelta(seconds=30),
        cost_usd=0.025,
        output_urls=["https://cdn/x.png", "https://cdn/y.png"],
    )
    assert done.state is SubmissionState.COMPLETED and done.is_finished
    assert done.finished_at == T0 + timedelta(seconds=30)
    assert done.cost_usd == pytest.approx(0.025)
    assert done.output_urls == ("https://cdn/x.png", "https://cdn/y.png")
    assert done.updated_at >= done.intent_at

    history = _history(ledger, intent.row_key)
    assert history.latest == done and history.completed == done and history.live == done
    assert ledger.submissions("p1") == [done]
    assert ledger.submissions("other") == []
    assert ledger.stats()["completed"] == 1 and sum(ledger.stats().values()) == 1


def test_attempts_numbering_and_paid_counting(ledger: Ledger) -> None:
    first = record_row_intent(ledger)
    ledger.record_rejected(first.id, "422: prompt too long")
    second = record_row_intent(ledger)
    ledger.record_submitted(second.id, "req-2")
    ledger.record_finished(second.id, SubmissionState.FAILED, error="job failed")
    third = record_row_intent(ledger)
    assert [first.attempt, second.attempt, third.attempt] == [1, 2, 3]
    assert first.row_key == second.row_key == third.row_key
    # A different row starts at 1 again.
    assert record_row_intent(ledger, "r2").attempt == 1

    history = _history(ledger, first.row_key)
    assert [a.attempt for a in history.attempts] == [1, 2, 3]
    assert [a.state for a in history.attempts] == ["rejected", "failed", "intent"]
    # rejected is not paid; the failed job and the (maybe sent) intent are.
    assert history.paid_attempts == 2
    assert history.live is None and history.completed is None
    assert history.dangling_intent is not None and history.dangling_intent.id == third.id


def test_rejected_is_not_paid_and_not_dangling(ledger: Ledger) -> None:
    intent = record_row_intent(ledger)
    rejected = ledger.record_rejected(intent.id, "400 bad request")
    assert rejected.error == "400 bad request" and not rejected.is_paid
    history = _history(ledger, intent.row_key)
    assert history.paid_attempts == 0
    assert history.dangling_intent is None and history.live is None


def test_unknown_is_paid_dangling_and_can_still_learn_its_id(ledger: Ledger) -> None:
    intent = record_row_intent(ledger)
    unknown = ledger.record_unknown(intent.id, "read timeout after submit")
    history = _history(ledger, intent.row_key)
    assert history.paid_attempts == 1 and history.dangling_intent == unknown
    ledger.record_submitted(intent.id, "req-late")
    assert _history(ledger, intent.row_key).dangling_intent is None


def test_live_prefers_the_latest_job_that_may_still_complete(ledger: Ledger) -> None:
    a = record_row_intent(ledger)
    ledger.record_submitted(a.id, "req-a")
    ledger.record_finished(a.id, "cancelled")
    b = record_row_intent(ledger)
    ledger.record_submitted(b.id, "req-b")
    history = _history(ledger, a.row_key)
    assert history.live is not None and history.live.request_id == "req-b"
    ledger.record_finished(b.id, "completed", output_urls=["u"])
    history = _history(ledger, a.row_key)
    assert history.completed is not None and history.completed.request_id == "req-b"
    assert history.live == history.completed


@pytest.mark.parametrize(
    ("setup", "action", "message"),
    [
        ("intent", lambda led, s: led.record_finished(s.id, "completed"), "no request id"),
        ("submitted", lambda led, s: led.record_rejected(s.id, "x"), "state 'submitted'"),
        ("submitted", lambda led, s: led.record_unknown(s.id, "x"), "state 'submitted'"),
        ("submitted", lambda led, s: led.record_submitted(s.id, "other"), "state 'submitted'"),
        ("rejected", lambda led, s: led.record_submitted(s.id, "r"), "state 'rejected'"),
        ("intent", lambda led, s: led.record_finished(999, "failed"), "no such submission"),
        ("intent", lambda led, s: led.record_submitted(999, "req-y"), "no such"),
    ],
)
def test_forbidden_transitions_raise_state_error(
    ledger: Ledger, setup: str, action: Any, message: str
) -> None:
    sub = record_row_intent(ledger)
    if setup == "submitted":
        ledger.record_submitted(sub.id, "req-x")
    elif setup == "rejected":
        ledger.record_rejected(sub.id, "no")
    with pytest.raises(LedgerStateError, match=message):
        action(ledger, sub)


def test_idempotent_rewrites_are_allowed(ledger: Ledger) -> None:
    sub = record_row_intent(ledger)
    ledger.record_submitted(sub.id, "req-1")
    ledger.record_submitted(sub.id, "req-1")
    ledger.record_finished(sub.id, "completed", output_urls=["u"])
    again = ledger.record_finished(sub.id, "completed", output_urls=["u", "v"])
    assert again.output_urls == ("u", "v")


def test_request_id_is_unique_across_submissions(ledger: Ledger) -> None:
    a, b = record_row_intent(ledger, "a"), record_row_intent(ledger, "b")
    ledger.record_submitted(a.id, "req-same")
    with pytest.raises(LedgerStateError, match="already recorded"):
        ledger.record_submitted(b.id, "req-same")
    assert _history(ledger, b.row_key).latest.state is SubmissionState.INTENT


def test_argument_validation(ledger: Ledger) -> None:
    sub = record_row_intent(ledger)
    with pytest.raises(ValueError, match="timezone-aware"):
        ledger.record_submitted(sub.id, "req", datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="finished state"):
        ledger.record_finished(sub.id, "submitted")
    with pytest.raises(ValueError, match="non-empty"):
        ledger.record_intent("", "p", "r", "h")


def test_lookup_5000_keys_in_chunks(ledger: Ledger) -> None:
    keys = [make_row_key("p", str(i), "h") for i in range(5000)]
    with ledger.engine.begin() as conn:
        # Bulk-seed through the same table for speed; every 3rd key has two attempts.
        from flux2_pipeline.ledger.schema import submissions

        rows: list[dict[str, Any]] = []
        for i, key in enumerate(keys):
            for attempt in range(1, 3 if i % 3 == 0 else 2):
                rows.append(
                    {
                        "row_key": key,
                        "partition": "p",
                        "row_id": str(i),
                        "request_hash": "h",
                        "attempt": attempt,
                        "state": "failed" if attempt == 1 and i % 3 == 0 else "submitted",
                        "request_id": f"req-{i}-{attempt}",
                        "intent_at": T0,
                        "output_urls": "[]",
                        "updated_at": T0,
                    }
                )
        conn.execute(submissions.insert(), rows)

    with selects_sent(ledger) as selects:
        found = ledger.lookup([*keys, *keys[:10], "never-seen"])

    assert len(selects) == -(-5001 // LOOKUP_CHUNK_SIZE)
    assert len(found) == 5000 and "never-seen" not in found
    assert [a.attempt for a in found[keys[0]].attempts] == [1, 2]
    live = found[keys[0]].live
    assert live is not None and live.request_id == "req-0-2"
    assert len(found[keys[1]].attempts) == 1
    assert ledger.lookup([]) == {}


def test_threads_share_one_ledger(ledger: Ledger) -> None:
    key = make_row_key("p", "shared", "h")

    def work(i: int) -> int:
        sub = ledger.record_intent(key, "p", "shared", "h")
        ledger.record_submitted(sub.id, f"req-t{i}")
        return sub.attempt

    with ThreadPoolExecutor(8) as pool:
        attempts = sorted(pool.map(work, range(40)))
    assert attempts == list(range(1, 41))
