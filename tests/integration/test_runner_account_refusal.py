"""What runners sharing a ledger learn from each other about the account.

An account refusal: against the emulator, whose balance runs out, the first runner to be
refused records it; a runner that was already running learns it from the ledger and sends
nothing more; a runner started after the top-up pays for the rest. A dead run's jobs:
a runner waiting for an account slot follows them to their end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux2_pipeline.batch import EditRunner, RowOutcome, read_input_rows
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import ClaimRequest, Ledger, make_row_key
from flux2_pipeline.runcomfy import AsyncRunComfyClient, EditRequest, PollSchedule
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table


@pytest.fixture
def service() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(
        port=0, latency=0.05, max_concurrent=8, token=TEST_TOKEN, seed=5, balance_usd=0.075
    )
    with EmulatorServer(config) as server:
        yield server


async def _drain(runner: EditRunner, table: Path) -> list[RowOutcome]:
    return [outcome async for outcome in runner.run(read_input_rows(table))]


async def test_a_refusal_reaches_every_run_sharing_the_ledger_and_not_a_later_one(
    tmp_path: Path, service: EmulatorServer
) -> None:
    first = write_table(tmp_path, "first", prompt_rows(service.base_url, "a", 6))
    second = write_table(tmp_path, "second", prompt_rows(service.base_url, "b", 6))
    third = write_table(tmp_path, "third", prompt_rows(service.base_url, "c", 3))
    counters = service.state.counters
    poll = PollSchedule(0.02, 0.2, 0.15)
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        async with AsyncRunComfyClient(TEST_TOKEN, service.base_url, poll=poll) as client:
            # Both runs are under way before the account is refused (one at a time, so the
            # order is certain; each has its own in-process stop, as two processes would).
            running = EditRunner(client, ledger, partition="first", max_concurrency=1)
            beside = EditRunner(client, ledger, partition="second", max_concurrency=1)
            outcomes = await _drain(running, first)
            assert [o.status for o in outcomes] == ["completed"] * 3 + ["failed"] * 3
            assert counters.rejected_400002 == 1  # the fourth submit; then no more
            refusal = ledger.account_refusal()
            assert refusal is not None and "400002" in refusal.reason

            learned = await _drain(beside, second)
            assert counters.rejected_400002 == 1  # it sent nothing: the ledger told it
            assert beside.counters.account_refused == 6 and beside.counters.submitted == 0
            for outcome in learned:
                assert outcome.status == "failed" and outcome.request_id is None
                assert (outcome.error or "").startswith(
                    "not submitted: account balance too low (400002)"
                )

            service.state.update_settings({"balance_usd": 1.0})  # the top-up
            later = EditRunner(client, ledger, partition="third", max_concurrency=1)
            assert [o.status for o in await _drain(later, third)] == ["completed"] * 3
    assert counters.jobs_created == 6 and counters.duplicate_bodies == 0


async def test_rows_waiting_for_a_slot_finish_the_jobs_of_a_run_that_died(
    tmp_path: Path,
) -> None:
    # A dead run's two jobs still run at the API and hold both slots of the account. No
    # one re-runs their partition: the runner waiting for a slot follows them to their end
    # and records it, instead of waiting out ORPHANED_JOB_SLOT_SECONDS (30 min).
    config = EmulatorConfig(port=0, latency=1.0, max_concurrent=8, token=TEST_TOKEN, seed=3)
    with EmulatorServer(config) as service, Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        poll = PollSchedule(0.02, 0.2, 0.15)
        table = write_table(tmp_path, "live", prompt_rows(service.base_url, "live", 3))
        dead_rows = prompt_rows(service.base_url, "dead", 2)
        async with AsyncRunComfyClient(TEST_TOKEN, service.base_url, poll=poll) as client:
            for row in dead_rows:
                request = EditRequest.parse({k: v for k, v in row.items() if k != "id"})
                key = make_row_key("dead", row["id"], request.fingerprint())
                claim = ClaimRequest(key, "dead", row["id"], request.fingerprint())
                [decision] = ledger.claim(
                    [claim], holder="dead-run", max_attempts=9, lease_seconds=0.2
                )
                assert decision.attempt is not None
                handle = await client.submit(request)
                ledger.record_submitted(decision.attempt.id, handle.request_id)
            await asyncio.sleep(0.3)  # the dead run's lease runs out; its jobs run on
            assert ledger.open_attempts() == 2

            runner = EditRunner(
                client, ledger, partition="live", max_concurrency=2, account_concurrency=2
            )
            outcomes = await asyncio.wait_for(_drain(runner, table), timeout=60)
        assert [o.status for o in outcomes] == ["completed"] * 3
        assert runner.counters.adopted_orphans == 2
        dead = ledger.submissions("dead")
        assert [attempt.state.value for attempt in dead] == ["completed", "completed"]
        assert ledger.open_attempts() == 0
        assert service.state.counters.max_in_progress <= 2  # the cap held throughout
        assert service.state.counters.jobs_created == 5
