"""An account refusal stops every run sharing the ledger, and a later run tries again.

Runners over one SQLite ledger against the emulator, whose balance runs out: the first
runner to be refused records it; a runner that was already running learns it from the
ledger and sends nothing more; a runner started after the top-up pays for the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flux2_pipeline.batch import EditRunner, RowOutcome, read_input_rows
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger
from flux2_pipeline.runcomfy import AsyncRunComfyClient, PollSchedule
from tests.conftest import TEST_TOKEN, prompt_rows, write_table


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
