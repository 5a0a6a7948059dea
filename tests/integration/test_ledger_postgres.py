"""The ledger against the real PostgreSQL server; each test gets a fresh database.

What holds on both backends is in test_ledger_lifecycle.py and test_ledger_claims.py; here is what
is PostgreSQL's own: schemas, row locks, passwords in URLs, no spill file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from flux2_pipeline.ledger import (
    LOOKUP_CHUNK_SIZE,
    ClaimAction,
    ClaimRequest,
    Ledger,
    LedgerStateError,
    LedgerUnavailableError,
    SubmissionState,
    make_row_key,
    parse_ledger_url,
)
from flux2_pipeline.ledger.schema import submissions
from tests.helpers.ledger import selects_sent

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
# A named schema inside the fresh database: the ledger creates it on first open.
SCHEMA = "ledger_test"


@pytest.fixture
def ledger(postgres_database: str) -> Iterator[Ledger]:
    with Ledger.open(postgres_database, schema=SCHEMA) as opened:
        yield opened


def test_lifecycle(ledger: Ledger) -> None:
    assert ledger.backend == "postgresql"
    key = make_row_key("p", "r1", "h")
    first = ledger.record_intent(key, "p", "r1", "h")
    ledger.record_rejected(first.id, "422")
    second = ledger.record_intent(key, "p", "r1", "h")
    assert (first.attempt, second.attempt) == (1, 2)
    assert second.intent_at.tzinfo is UTC

    history = ledger.lookup([key])[key]
    assert history.dangling_intent == second and history.paid_attempts == 1

    submitted = ledger.record_submitted(second.id, "req-pg-1", T0)
    assert submitted.submitted_at == T0
    assert ledger.lookup([key])[key].live == submitted

    done = ledger.record_finished(
        second.id,
        "completed",
        T0 + timedelta(seconds=5),
        cost_usd=0.02,
        output_urls=["https://cdn/a.png"],
    )
    assert done.finished_at == T0 + timedelta(seconds=5) and done.finished_at.tzinfo is UTC
    history = ledger.lookup([key])[key]
    assert history.completed == done and history.live == done
    assert [a.state for a in history.attempts] == ["rejected", "completed"]
    assert history.paid_attempts == 1
    stats = ledger.stats("p")
    assert (stats["rejected"], stats["completed"], stats["intent"]) == (1, 1, 0)
    assert [s.id for s in ledger.submissions()] == [first.id, second.id]

    other = ledger.record_intent(make_row_key("p", "r2", "h"), "p", "r2", "h")
    with pytest.raises(LedgerStateError, match="already recorded"):
        ledger.record_submitted(other.id, "req-pg-1")
    with pytest.raises(LedgerStateError, match="no request id"):
        ledger.record_finished(other.id, SubmissionState.FAILED)


def test_lookup_5000_keys_in_chunks(ledger: Ledger) -> None:
    keys = [make_row_key("p", str(i), "h") for i in range(5000)]
    rows = [
        {
            "row_key": key,
            "partition": "p",
            "row_id": str(i),
            "request_hash": "h",
            "attempt": 1,
            "state": "submitted",
            "request_id": f"req-{i}",
            "intent_at": T0,
            "output_urls": "[]",
            "updated_at": T0,
        }
        for i, key in enumerate(keys)
    ]
    with ledger.engine.begin() as conn:
        conn.execute(submissions.insert(), rows)

    with selects_sent(ledger) as selects:
        found = ledger.lookup([*keys, "never-seen"])
    assert len(selects) == -(-5001 // LOOKUP_CHUNK_SIZE)
    assert len(found) == 5000
    live = found[keys[4999]].live
    assert live is not None and live.request_id == "req-4999"


def test_concurrent_intents_for_one_key_get_distinct_attempts(ledger: Ledger) -> None:
    key = make_row_key("p", "hot", "h")
    barrier = threading.Barrier(8)

    def work(_: int) -> list[int]:
        barrier.wait()
        return [ledger.record_intent(key, "p", "hot", "h").attempt for _ in range(5)]

    with ThreadPoolExecutor(8) as pool:
        attempts = sorted(a for batch in pool.map(work, range(8)) for a in batch)
    assert attempts == list(range(1, 41))


def test_concurrent_first_open_of_a_fresh_schema(postgres_database: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def opener() -> None:
        barrier.wait()
        try:
            Ledger.open(postgres_database, schema=SCHEMA).close()
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_repr_and_errors_hide_a_real_password(postgres_database: str) -> None:
    # The test server trusts local connections, so any password is accepted.
    with_password = make_url(postgres_database).set(password="s3cret-pg").render_as_string(False)
    with Ledger.open(with_password, schema=SCHEMA) as ledger:
        assert "s3cret-pg" not in repr(ledger) and "s3cret-pg" not in ledger.url
        assert ":***@" in repr(ledger)
        with pytest.raises(LedgerStateError) as info:
            ledger.record_finished(12345, "failed")
        assert "s3cret-pg" not in str(info.value)


def test_a_stuck_lock_is_an_error_to_retry_not_a_hang(
    postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another session holds the account row (as a stuck process would) past the timeout.
    monkeypatch.setattr("flux2_pipeline.ledger.store.PG_LOCK_TIMEOUT_MS", 300)
    with Ledger.open(postgres_database, schema=SCHEMA) as ledger:
        request = ClaimRequest(make_row_key("p", "r", "h"), "p", "r", "h", price_usd=0.05)
        other = create_engine(parse_ledger_url(postgres_database))
        try:
            with other.connect() as conn, ThreadPoolExecutor(1) as pool:
                held = conn.begin()
                conn.execute(
                    text(f'SELECT * FROM "{SCHEMA}".flux2_ledger_account WHERE id = 1 FOR UPDATE')
                )
                claiming = pool.submit(
                    ledger.claim, [request], holder="A", max_attempts=9, budget_usd=1.0
                )
                try:
                    with pytest.raises(LedgerUnavailableError, match="lock timeout"):
                        claiming.result(timeout=20)
                finally:
                    held.rollback()
        finally:
            other.dispose()
        # Nothing was written; once the lock is gone the same claim goes through.
        [decision] = ledger.claim([request], holder="A", max_attempts=9, budget_usd=1.0)
        assert decision.action is ClaimAction.SUBMIT
        assert ledger.spent_usd() == pytest.approx(0.05)


def test_there_is_no_spill_file_beside_a_postgresql_ledger(ledger: Ledger) -> None:
    intent = ledger.record_intent(make_row_key("p", "r", "h"), "p", "r", "h")
    assert ledger.spill_path is None
    assert not ledger.spill_submitted(intent.id, "job-1", T0)
