"""Group commit: concurrent rows' ledger writes share one transaction, answered after commit."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from flux2_pipeline.batch.group_commit import GroupCommit
from flux2_pipeline.ledger import (
    ClaimAction,
    ClaimRequest,
    Ledger,
    LedgerStateError,
    LedgerUnavailableError,
    make_row_key,
)


def _request(row_id: str) -> ClaimRequest:
    return ClaimRequest(make_row_key("p", row_id, "h"), "p", row_id, "h")


async def test_writes_of_one_loop_turn_are_one_transaction(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        writes = GroupCommit(ledger)

        async def claim(row_id: str) -> ClaimAction:
            [decision] = await writes(
                lambda: ledger.claim([_request(row_id)], holder="A", max_attempts=9)
            )
            return decision.action

        actions = await asyncio.gather(*(claim(f"r{i}") for i in range(50)))
        assert actions == [ClaimAction.SUBMIT] * 50
        assert writes.transactions == 1 and writes.writes == 50
        assert len(ledger.submissions("p")) == 50


async def test_a_refused_write_fails_alone(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        [decision] = ledger.claim([_request("r1")], holder="A", max_attempts=9)
        assert decision.attempt is not None
        intent = decision.attempt.id
        writes = GroupCommit(ledger)
        good = writes(lambda: ledger.record_submitted(intent, "job-1"))
        bad = writes(lambda: ledger.record_finished(999, "completed", output_urls=["u"]))
        results = await asyncio.gather(good, bad, return_exceptions=True)
        assert results[0].request_id == "job-1"  # type: ignore[union-attr]
        assert isinstance(results[1], LedgerStateError)
        assert writes.transactions == 1


async def test_nothing_is_answered_when_the_commit_fails(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "ledger.sqlite")
    writes = GroupCommit(ledger)
    ledger.close()
    with pytest.raises(Exception, match="closed"):
        await writes(lambda: ledger.claim([_request("r1")], holder="A", max_attempts=9))
    assert writes.transactions == 0


def _hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection takes the SQLite write lock and keeps it for `seconds`."""
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(seconds)
            conn.execute("COMMIT")
        finally:
            conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(10)
    return thread


async def test_a_write_that_breaks_its_batch_fails_alone(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        writes = GroupCommit(ledger)

        def broken() -> None:
            raise RuntimeError("this write is broken")

        results = await asyncio.gather(
            writes(lambda: ledger.claim([_request("r1")], holder="A", max_attempts=9)),
            writes(broken),
            writes(lambda: ledger.claim([_request("r2")], holder="A", max_attempts=9)),
            return_exceptions=True,
        )
        assert isinstance(results[1], RuntimeError)
        assert [r[0].action for r in (results[0], results[2])] == [ClaimAction.SUBMIT] * 2  # type: ignore[index]
        assert [a.row_id for a in ledger.submissions("p")] == ["r1", "r2"]


async def test_the_loop_runs_on_while_a_write_waits_for_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flux2_pipeline.ledger.store.SQLITE_BUSY_TIMEOUT_MS", 5000)
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger:
        writes = GroupCommit(ledger)
        holder = _hold_write_lock(path, 1.0)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        try:
            [decision] = await writes(
                lambda: ledger.claim([_request("r1")], holder="A", max_attempts=9)
            )
        finally:
            ticker.cancel()
            holder.join()
        assert decision.action is ClaimAction.SUBMIT
        assert ticks >= 20  # about 100 in the second the write waited; 0 on a frozen loop


async def test_a_kept_write_outlasts_the_database_failing_and_others_give_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flux2_pipeline.ledger.store.SQLITE_BUSY_TIMEOUT_MS", 100)
    monkeypatch.setattr("flux2_pipeline.batch.group_commit.GIVE_UP_SECONDS", 0.3)
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger:
        [decision] = ledger.claim([_request("r1")], holder="A", max_attempts=9)
        assert decision.attempt is not None
        intent = decision.attempt.id
        writes = GroupCommit(ledger)
        holder = _hold_write_lock(path, 1.5)
        try:
            # Tried in the order handed in: the claim gives up, then the request id waits.
            dropped = writes(lambda: ledger.claim([_request("r2")], holder="A", max_attempts=9))
            kept = writes(lambda: ledger.record_submitted(intent, "job-1"), keep=True)
            results = await asyncio.gather(dropped, kept, return_exceptions=True)
        finally:
            holder.join()
        assert isinstance(results[0], LedgerUnavailableError)
        assert "locked" in str(results[0])
        assert results[1].request_id == "job-1"  # type: ignore[union-attr]
        assert writes.retries >= 2
        assert [(a.row_id, a.request_id) for a in ledger.submissions("p")] == [("r1", "job-1")]
