"""Claims: one payer per row across processes, leases, budget reservations, account slots.

Every test on the `ledger` fixture runs on SQLite and on the real PostgreSQL server.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from flux2_pipeline.ledger import (
    ClaimAction,
    ClaimRequest,
    Ledger,
    SubmissionState,
    make_row_key,
)


def _request(row_id: str, price: float | None = None) -> ClaimRequest:
    return ClaimRequest(make_row_key("p", row_id, "h"), "p", row_id, "h", price_usd=price)


def _claim(ledger: Ledger, row_id: str, holder: str = "A", **options: object) -> ClaimAction:
    options.setdefault("max_attempts", 9)
    [decision] = ledger.claim([_request(row_id)], holder=holder, **options)  # type: ignore[arg-type]
    return decision.action


# -- the ledger applies it ------------------------------------------------------------------


def test_a_claim_makes_the_others_wait_then_follow(ledger: Ledger) -> None:
    [mine] = ledger.claim([_request("r1")], holder="A", max_attempts=9)
    assert mine.action is ClaimAction.SUBMIT and mine.attempt is not None
    assert mine.attempt.holder == "A" and mine.attempt.state is SubmissionState.INTENT
    assert _claim(ledger, "r1", holder="B") is ClaimAction.WAIT
    ledger.record_submitted(mine.attempt.id, "job-1")
    assert _claim(ledger, "r1", holder="B") is ClaimAction.FOLLOW
    ledger.record_finished(mine.attempt.id, "failed", error="MODEL_ERROR: boom")
    [again] = ledger.claim([_request("r1")], holder="B", max_attempts=9)
    assert again.action is ClaimAction.SUBMIT and not again.took_over
    assert again.attempt is not None and again.attempt.attempt == 2
    assert _claim(ledger, "r1", holder="A") is ClaimAction.WAIT


def test_a_lapsed_claim_is_taken_over_and_counted(ledger: Ledger) -> None:
    ledger.claim([_request("r1")], holder="A", max_attempts=9, lease_seconds=0.0)
    [second] = ledger.claim([_request("r1")], holder="B", max_attempts=9)
    assert second.action is ClaimAction.SUBMIT and second.took_over
    states = [s.state for s in ledger.submissions("p")]
    assert states == [SubmissionState.UNKNOWN, SubmissionState.INTENT]
    assert second.paid_attempts == 1  # the lapsed intent may have been paid for


def test_renew_keeps_a_claim_alive(ledger: Ledger) -> None:
    ledger.claim([_request("r1")], holder="A", max_attempts=9, lease_seconds=0.0)
    assert ledger.renew("A", lease_seconds=60) == 1
    assert _claim(ledger, "r1", holder="B") is ClaimAction.WAIT


def test_budget_reserves_prices_and_settles_to_the_reported_cost(ledger: Ledger) -> None:
    requests = [_request(f"r{i}", price=0.05) for i in range(5)]
    decisions = ledger.claim(requests, holder="A", max_attempts=9, budget_usd=0.12)
    actions = [d.action for d in decisions]
    assert actions == [ClaimAction.SUBMIT] * 2 + [ClaimAction.OVER_BUDGET] * 3
    assert ledger.spent_usd() == pytest.approx(0.10)
    first = decisions[0].attempt
    assert first is not None
    ledger.record_submitted(first.id, "job-1")
    ledger.record_finished(first.id, "completed", cost_usd=0.02, output_urls=["u"])
    assert ledger.spent_usd() == pytest.approx(0.07)
    second = decisions[1].attempt
    assert second is not None
    ledger.record_rejected(second.id, "HTTP 422")
    assert ledger.spent_usd() == pytest.approx(0.02)
    # Re-recording a finished job (a second follower) does not count it twice.
    ledger.record_finished(first.id, "completed", cost_usd=0.02, output_urls=["u"])
    assert ledger.spent_usd() == pytest.approx(0.02)


def test_account_slots_cap_open_attempts_over_every_holder(ledger: Ledger) -> None:
    cap = {"account_concurrency": 2, "max_attempts": 9}
    assert _claim(ledger, "r1", holder="A", **cap) is ClaimAction.SUBMIT
    assert _claim(ledger, "r2", holder="B", **cap) is ClaimAction.SUBMIT
    assert _claim(ledger, "r3", holder="A", **cap) is ClaimAction.WAIT_FOR_SLOT
    assert ledger.open_attempts() == 2
    [first] = ledger.submissions("p")[:1]
    ledger.record_submitted(first.id, "job-1")
    ledger.record_finished(first.id, "completed", output_urls=["u"])
    assert _claim(ledger, "r3", holder="A", **cap) is ClaimAction.SUBMIT


def test_an_older_ledger_gains_the_claim_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE flux2_submissions (id INTEGER PRIMARY KEY, row_key VARCHAR(64) "
                "NOT NULL, partition TEXT NOT NULL, row_id TEXT NOT NULL, request_hash TEXT "
                "NOT NULL, attempt INTEGER NOT NULL, state VARCHAR(16) NOT NULL, request_id "
                "TEXT, intent_at DATETIME NOT NULL, submitted_at DATETIME, finished_at "
                "DATETIME, error TEXT, cost_usd FLOAT, output_urls TEXT NOT NULL, updated_at "
                "DATETIME NOT NULL)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO flux2_submissions VALUES (1, 'k', 'p', 'r', 'h', 1, 'completed', "
                "'job-1', '2026-01-01 00:00:00', NULL, '2026-01-01 00:01:00', NULL, 0.25, "
                "'[\"u\"]', '2026-01-01 00:01:00')"
            )
        )
    engine.dispose()
    with Ledger.open(path) as ledger:
        assert ledger.spent_usd() == pytest.approx(0.25)
        assert _claim(ledger, "r9") is ClaimAction.SUBMIT


# -- two processes, one ledger ----------------------------------------------------------------

ROWS = 150


def _claim_all(url: str, schema: str | None, holder: str, start: object) -> list[str]:
    with Ledger.open(url, schema=schema) as ledger:
        start.wait()  # type: ignore[attr-defined]
        won = []
        for i in range(ROWS):
            [decision] = ledger.claim([_request(f"r{i}")], holder=holder, max_attempts=9)
            if decision.action is ClaimAction.SUBMIT:
                won.append(f"r{i}")
        return won


def test_two_processes_never_both_win_a_row(ledger_url: str, ledger_schema: str | None) -> None:
    url, schema = ledger_url, ledger_schema
    Ledger.open(url, schema=schema).close()  # tables exist before the race starts
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Event()
        with context.Pool(2) as pool:
            results = [
                pool.apply_async(_claim_all, (url, schema, holder, start)) for holder in ("A", "B")
            ]
            start.set()
            won = [result.get(timeout=240) for result in results]
    assert sorted(won[0] + won[1]) == sorted(f"r{i}" for i in range(ROWS))
    assert not set(won[0]) & set(won[1])
    with Ledger.open(url, schema=schema) as ledger:
        assert len(ledger.submissions("p")) == ROWS
