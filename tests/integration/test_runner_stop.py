"""A stopped runner (the task running it cancelled, as a stopped Dagster step does).

Against the real emulator on loopback: the queued jobs are cancelled through the API, no
row that was waiting for a free slot starts a job after the stop, and the ledger is left
with every paid job named and no intent or unknown attempt behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux2_pipeline.batch import EditRunner, ReferenceCheck, RowOutcome, read_input_rows
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger, SubmissionState
from flux2_pipeline.net import AddressPolicy, GuardedFetcher
from flux2_pipeline.runcomfy import AsyncRunComfyClient, PollSchedule
from flux2_pipeline.runcomfy.models import JobState
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def held_emulator() -> Iterator[EmulatorServer]:
    """One job runs at a time and never ends on its own: the rest stay queued."""
    config = EmulatorConfig(port=0, latency=3600, max_concurrent=1, token=TEST_TOKEN, seed=4)
    with EmulatorServer(config) as server:
        yield server


async def test_a_stop_cancels_queued_jobs_and_starts_no_new_one(
    tmp_path: Path, held_emulator: EmulatorServer
) -> None:
    state = held_emulator.state
    table = write_table(tmp_path, "p", prompt_rows(held_emulator.base_url, "s", 8))
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        async with (
            AsyncRunComfyClient(
                TEST_TOKEN, held_emulator.base_url, poll=PollSchedule(0.02, 0.2, 0.15)
            ) as client,
            GuardedFetcher(AddressPolicy.for_api(held_emulator.base_url)) as fetcher,
        ):
            runner = EditRunner(client, ledger, partition="p", max_concurrency=3)
            runner.preflight = ReferenceCheck(fetcher.probe)

            async def consume() -> list[RowOutcome]:
                return [outcome async for outcome in runner.run(read_input_rows(table))]

            running = asyncio.create_task(consume())
            deadline = time.monotonic() + 120
            while (state.counters.jobs_created, state.in_progress) != (3, 1):
                assert time.monotonic() < deadline, "the runner never had 3 jobs in flight"
                assert not running.done()
                await asyncio.sleep(0.05)  # polling the emulator's state
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running

        # The two queued jobs were cancelled; the running one was left alone; the five
        # rows that waited for a slot never sent anything.
        assert state.counters.cancelled_jobs == 2
        assert state.counters.jobs_created == 3
        cancelled = {j.request_id for j in state.jobs.values() if j.state is JobState.CANCELLED}
        live = {j.request_id for j in state.jobs.values() if j.state is JobState.IN_PROGRESS}
        # Every paid job is named in the ledger as what it is; the rows that waited for a
        # slot were stopped before claiming anything (no intent, no released claim).
        recorded = {(a.state, a.request_id) for a in ledger.submissions("p")}
        assert recorded == {
            *((SubmissionState.CANCELLED, rid) for rid in cancelled),
            *((SubmissionState.SUBMITTED, rid) for rid in live),
        }
