"""Group commit: concurrent rows' ledger writes share one transaction, answered after commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flux2_pipeline.batch.group_commit import GroupCommit
from flux2_pipeline.ledger import ClaimAction, ClaimRequest, Ledger, LedgerStateError, make_row_key


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
