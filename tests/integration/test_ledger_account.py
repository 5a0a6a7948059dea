"""The account the ledger keeps for every runner: spend, slots and refusals.

On SQLite and on the real PostgreSQL server (a fresh schema per test), against the real
emulator on loopback where the API takes part: cancelled queued jobs give their budget
back, a dead runner's jobs keep their account slots until a run follows them to their
end, and an account-level refusal recorded by one run stops the others' submits.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flux2_pipeline.batch import EditRunner, RowOutcome, read_input_rows
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import (
    ClaimAction,
    ClaimRequest,
    Ledger,
    SubmissionState,
    make_row_key,
)
from flux2_pipeline.ledger.schema import REFUSALS_TABLE_NAME
from flux2_pipeline.runcomfy import AsyncRunComfyClient, PollSchedule
from flux2_pipeline.runcomfy.models import JobState
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Where:
    """How to open one ledger: from this process, and from a subprocess's command line."""

    url: str
    schema: str | None

    def open(self) -> Ledger:
        return Ledger.open(self.url, schema=self.schema)


@pytest.fixture
def where(ledger_url: str, ledger_schema: str | None) -> Where:
    """The `ledger` fixture's ledger, for a subprocess to open as well."""
    return Where(ledger_url, ledger_schema)


async def _run(
    emulator: EmulatorServer, ledger: Ledger, table: Path, partition: str, **options: Any
) -> list[RowOutcome]:
    async with AsyncRunComfyClient(
        TEST_TOKEN, emulator.base_url, poll=PollSchedule(0.05, 0.2, 0.15)
    ) as client:
        runner = EditRunner(client, ledger, partition=partition, **options)
        return [outcome async for outcome in runner.run(read_input_rows(table))]


# -- item: cancelled queued jobs give their reservation back --------------------------


async def test_cancelled_queued_jobs_give_their_budget_back(tmp_path: Path, ledger: Ledger) -> None:
    config = EmulatorConfig(
        port=0, latency=0.3, max_concurrent=2, token=TEST_TOKEN, seed=8, price_usd=0.05
    )
    with EmulatorServer(config) as emulator:
        state = emulator.state
        table = write_table(tmp_path, "p", prompt_rows(emulator.base_url, "c", 20))
        money: dict[str, Any] = {"budget_usd": 1.00, "price_per_image_usd": 0.05}

        # 8 jobs in flight, 2 running (held) and 6 queued; then the run is stopped.
        state.faults.update(hold_jobs=True)
        running = asyncio.ensure_future(_run(emulator, ledger, table, "p", **money))
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: (state.counters.jobs_created, state.in_progress) == (8, 2),
                "8 in flight",
                timeout=120.0,
            )
            # Every answer arrived (no submit is cut short by the stop): 8 ids recorded.
            await asyncio.to_thread(
                wait_until,
                lambda: sum(a.request_id is not None for a in ledger.submissions("p")) == 8,
                "8 request ids in the ledger",
                timeout=120.0,
            )
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
        finally:
            state.faults.update(hold_jobs=False)
        assert state.counters.cancelled_jobs == 6
        # Only the two jobs that run can cost anything: the cancelled six gave theirs back.
        assert ledger.spent_usd() == pytest.approx(2 * 0.05)

        # Re-runs under the same budget: every row fits, so every row completes.
        outcomes = await _run(emulator, ledger, table, "p", max_concurrency=8, **money)
        assert [o.status for o in outcomes] == ["completed"] * 20, [o.error for o in outcomes]
        outcomes = await _run(emulator, ledger, table, "p", max_concurrency=8, **money)
        assert [o.status for o in outcomes] == ["completed"] * 20
        completed = sum(1 for job in state.jobs.values() if job.state is JobState.COMPLETED)
        assert completed == state.counters.completed_jobs == 20
        assert state.counters.jobs_created == 26
        assert ledger.spent_usd() == pytest.approx(completed * 0.05)
        states = [a.state for a in ledger.submissions("p")]
        assert states.count(SubmissionState.CANCELLED) == 6
        cancelled = [a for a in ledger.submissions("p") if a.state is SubmissionState.CANCELLED]
        assert all(a.charge_usd == 0.0 for a in cancelled)


def test_a_reported_cost_settles_a_cancelled_job(ledger: Ledger) -> None:
    key = make_row_key("p", "r", "h")
    request = ClaimRequest(key, "p", "r", "h", price_usd=0.05)
    [decision] = ledger.claim([request], holder="A", max_attempts=9, budget_usd=1.0)
    assert decision.attempt is not None
    ledger.record_submitted(decision.attempt.id, "job-1")
    # The API says what a job cancelled while it ran cost: that is the spend.
    ledger.record_finished(decision.attempt.id, "cancelled", cost_usd=0.02)
    assert ledger.spent_usd() == pytest.approx(0.02)


# -- item: a dead runner's jobs keep their account slots ------------------------------

DEAD_RUNNER = """
import asyncio, sys
from pathlib import Path
from flux2_pipeline.batch import EditRunner, read_input_rows
from flux2_pipeline.ledger import Ledger
from flux2_pipeline.runcomfy import AsyncRunComfyClient, PollSchedule

url, schema, base_url, token, table = sys.argv[1:6]

async def main() -> None:
    with Ledger.open(url, schema=schema or None) as ledger:
        async with AsyncRunComfyClient(token, base_url, poll=PollSchedule(0.05, 0.2, 0.15)) as c:
            runner = EditRunner(c, ledger, partition="a", max_concurrency=8,
                                lease_seconds=1.0, account_concurrency=4)
            async for _ in runner.run(read_input_rows(Path(table))):
                pass

asyncio.run(main())
"""


async def test_a_dead_runners_jobs_hold_their_slots_until_a_run_follows_them(
    tmp_path: Path, where: Where, ledger: Ledger
) -> None:
    cap = {"account_concurrency": 4, "lease_seconds": 1.0, "max_concurrency": 8}
    config = EmulatorConfig(port=0, latency=6.0, max_concurrent=64, token=TEST_TOKEN, seed=9)
    with EmulatorServer(config) as emulator:
        counters = emulator.state.counters
        table_a = write_table(tmp_path / "a", "a", prompt_rows(emulator.base_url, "a", 4))
        table_b = write_table(tmp_path / "b", "b", prompt_rows(emulator.base_url, "b", 4))
        args = [where.url, where.schema or "", emulator.base_url, TEST_TOKEN, str(table_a)]
        with subprocess.Popen([sys.executable, "-c", DEAD_RUNNER, *args]) as victim:
            try:

                def four_running() -> bool:
                    assert victim.poll() is None, "the runner ended before it was killed"
                    return counters.in_progress_now == 4

                await asyncio.to_thread(wait_until, four_running, "4 jobs running", timeout=120.0)
                await asyncio.to_thread(
                    wait_until,
                    lambda: _request_ids_known(ledger) == 4,
                    "4 ids recorded",
                    timeout=120.0,
                )
            finally:
                victim.send_signal(signal.SIGKILL)
                victim.wait(30)
        await asyncio.sleep(1.5)  # the dead runner's lease has run out
        # The API still runs the dead runner's 4 jobs, and the ledger counts them.
        assert counters.in_progress_now == 4
        assert ledger.open_attempts() == 4

        # Another partition must wait: the account is full.
        other = asyncio.ensure_future(_run(emulator, ledger, table_b, "b", **cap))
        await asyncio.sleep(1.0)
        assert counters.jobs_created == 4
        # The dead partition's re-run follows its jobs to their end, freeing the slots.
        rerun = asyncio.ensure_future(_run(emulator, ledger, table_a, "a", **cap))
        outcomes = await asyncio.gather(rerun, other)

    assert [o.status for run in outcomes for o in run] == ["completed"] * 8
    assert counters.jobs_created == 8 and counters.duplicate_bodies == 0
    assert counters.max_queue_length == 0
    assert counters.max_in_progress == 4  # never more than the cap in flight at the API
    assert ledger.open_attempts() == 0


def _request_ids_known(ledger: Ledger) -> int:
    return sum(1 for a in ledger.submissions("a") if a.request_id is not None)


def test_an_intent_without_a_request_id_holds_its_slot_only_for_its_lease(
    ledger: Ledger,
) -> None:
    requests = [ClaimRequest(make_row_key("p", f"r{i}", "h"), "p", f"r{i}", "h") for i in (1, 2)]
    decisions = ledger.claim(
        requests, holder="dead", max_attempts=9, lease_seconds=0.3, account_concurrency=4
    )
    submitted, intent = (d.attempt for d in decisions)
    assert submitted is not None and intent is not None
    ledger.record_submitted(submitted.id, "job-1")
    assert ledger.open_attempts() == 2
    time.sleep(0.5)  # the holder's lease runs out
    # The job with a request id still runs at the API; the intent's request may never
    # have left, so its slot lapses with the lease (as before).
    assert ledger.open_attempts() == 1
    ledger.record_finished(submitted.id, "completed", output_urls=["https://x/1.png"])
    assert ledger.open_attempts() == 0


# -- account-level refusals shared through the ledger -----------------------


def _claim(ledger: Ledger, row_id: str, **options: Any) -> Any:
    request = ClaimRequest(make_row_key("p", row_id, "h"), "p", row_id, "h", price_usd=0.05)
    [decision] = ledger.claim([request], holder="A", max_attempts=9, **options)
    return decision


def test_an_account_refusal_stops_submits_of_runs_that_were_running(ledger: Ledger) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    assert ledger.account_refusal() is None
    followed = _claim(ledger, "followed", refused_since=started)
    reused = _claim(ledger, "reused", refused_since=started)
    assert followed.action is reused.action is ClaimAction.SUBMIT
    ledger.record_submitted(followed.attempt.id, "job-followed")
    ledger.record_submitted(reused.attempt.id, "job-reused")
    ledger.record_finished(reused.attempt.id, "completed", output_urls=["https://x/r.png"])
    spent = ledger.spent_usd()

    refusal = ledger.record_account_refusal("account balance too low (400002): top up")
    assert ledger.account_refusal() == refusal
    assert refusal.expires_at - refusal.recorded_at == timedelta(seconds=600)

    refused = _claim(ledger, "new", refused_since=started, budget_usd=5.0)
    assert refused.action is ClaimAction.ACCOUNT_REFUSED
    assert refused.last_error == "account balance too low (400002): top up"
    assert refused.attempt is None
    assert ledger.lookup([make_row_key("p", "new", "h")]) == {}  # no intent written
    assert ledger.spent_usd() == pytest.approx(spent)  # nothing reserved
    # Rows with a job still follow or reuse it.
    assert _claim(ledger, "followed", refused_since=started).action is ClaimAction.FOLLOW
    assert _claim(ledger, "reused", refused_since=started).action is ClaimAction.REUSE
    # A run that started after the refusal (the user topped up) tries again, and so does
    # a caller that does not ask.
    later = datetime.now(UTC)
    assert _claim(ledger, "new", refused_since=later).action is ClaimAction.SUBMIT
    assert _claim(ledger, "other").action is ClaimAction.SUBMIT


def test_an_account_refusal_expires(ledger: Ledger) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    ledger.record_account_refusal("token refused (400004)", ttl_seconds=0.3)
    assert _claim(ledger, "a", refused_since=started).action is ClaimAction.ACCOUNT_REFUSED
    time.sleep(0.5)
    assert ledger.account_refusal() is None
    assert _claim(ledger, "a", refused_since=started).action is ClaimAction.SUBMIT
    with pytest.raises(ValueError, match="reason"):
        ledger.record_account_refusal(" ")
    with pytest.raises(ValueError, match="ttl_seconds"):
        ledger.record_account_refusal("x", ttl_seconds=0)


def test_the_latest_live_refusal_is_the_accounts_state(ledger: Ledger) -> None:
    ledger.record_account_refusal("first", ttl_seconds=60)
    ledger.record_account_refusal("second", ttl_seconds=60)
    refusal = ledger.account_refusal()
    assert refusal is not None and refusal.reason == "second"


def test_a_ledger_from_before_refusals_is_migrated_on_open(where: Where) -> None:
    with where.open() as old:
        key = make_row_key("p", "r", "h")
        old.record_intent(key, "p", "r", "h")
        table = (
            REFUSALS_TABLE_NAME
            if where.schema is None
            else f'"{where.schema}".{REFUSALS_TABLE_NAME}'
        )
        with old.engine.begin() as conn:  # what an older release left: no refusals table
            conn.exec_driver_sql(f"DROP TABLE {table}")
    with where.open() as reopened:
        assert reopened.account_refusal() is None
        reopened.record_account_refusal("account inactive (400004)")
        assert (
            _claim(reopened, "r2", refused_since=datetime.now(UTC) - timedelta(minutes=1)).action
            is ClaimAction.ACCOUNT_REFUSED
        )
        assert len(reopened.submissions("p")) == 1
