"""The runner's money rules against the real emulator on loopback and a real ledger.

Budget, unknown outcomes, jobs that fail because of their input, unfetchable references
and the attempt cap: each counted on the emulator, which sees every paid job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux2_pipeline.batch import EditRunner, ReferenceCheck, RowOutcome, read_input_rows
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger
from flux2_pipeline.net import AddressPolicy, GuardedFetcher
from flux2_pipeline.runcomfy import AsyncRunComfyClient, PollSchedule
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table


@pytest.fixture
def fast_emulator() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(port=0, latency=0.05, max_concurrent=64, token=TEST_TOKEN, seed=2)
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "ledger.sqlite") as opened:
        yield opened


async def _run(
    emulator: EmulatorServer,
    ledger: Ledger,
    table: Path,
    *,
    check_references: bool = True,
    lost_job_grace: float = 60.0,
    job_deadline: float = 1800.0,
    **options: Any,
) -> tuple[list[RowOutcome], EditRunner]:
    options.setdefault("max_concurrency", 8)
    async with AsyncRunComfyClient(
        TEST_TOKEN,
        emulator.base_url,
        poll=PollSchedule(0.02, 0.2, 0.15),
        lost_job_grace=lost_job_grace,
        job_deadline=job_deadline,
    ) as client:
        runner = EditRunner(client, ledger, partition="p", **options)
        async with GuardedFetcher(AddressPolicy.for_api(emulator.base_url)) as fetcher:
            if check_references:
                runner.preflight = ReferenceCheck(fetcher.probe)
            outcomes = [outcome async for outcome in runner.run(read_input_rows(table))]
    return outcomes, runner


async def test_a_budget_is_never_overshot_and_raising_it_pays_only_the_rest(
    tmp_path: Path,
    fast_emulator: EmulatorServer,
    ledger: Ledger,
) -> None:
    # The API reports 0.05 USD per image, the price the budget reserves.
    fast_emulator.state.faults.update(price_usd=0.05)
    table = write_table(tmp_path, "p", prompt_rows(fast_emulator.base_url, "b", 30))
    counters = fast_emulator.state.counters
    money = {"price_per_image_usd": 0.05, "max_concurrency": 8}

    outcomes, runner = await _run(fast_emulator, ledger, table, budget_usd=0.50, **money)
    statuses = [o.status for o in outcomes]
    assert counters.jobs_created <= 10
    assert statuses.count("completed") == counters.jobs_created
    over = [o for o in outcomes if o.status == "failed"]
    assert len(over) == 30 - counters.jobs_created
    assert all("FLUX2_BUDGET_USD=0.5" in (o.error or "") for o in over)
    assert runner.counters.over_budget == len(over) == runner.counters.final_failures
    assert ledger.spent_usd() <= 0.50 + 1e-9
    paid_first = counters.jobs_created

    outcomes, runner = await _run(fast_emulator, ledger, table, budget_usd=1.50, **money)
    assert [o.status for o in outcomes] == ["completed"] * 30
    assert counters.jobs_created == 30
    assert counters.duplicate_bodies == 0
    assert ledger.spent_usd() == pytest.approx(1.50)
    # Reused jobs are not new spend.
    assert runner.counters.reused_completed == paid_first
    assert runner.counters.new_cost_usd == pytest.approx(0.05 * (30 - paid_first))


async def test_unfetchable_references_are_never_paid_for(
    tmp_path: Path, fast_emulator: EmulatorServer, ledger: Ledger
) -> None:
    rows = prompt_rows(fast_emulator.base_url, "ok", 10)
    for i in (2, 5, 8):
        rows[i]["image_urls"] = [f"{fast_emulator.base_url}/gone/missing-{i}.png"]
    table = write_table(tmp_path, "p", rows)

    for _ in range(3):  # the first run, a step retry, a re-run: nothing changes the verdict
        outcomes, runner = await _run(fast_emulator, ledger, table)
        failed = [o for o in outcomes if o.status == "failed"]
        assert [o.row.row_id for o in failed] == ["ok-2", "ok-5", "ok-8"]
        for outcome in failed:
            assert "reference image cannot be fetched" in (outcome.error or "")
            assert f"/gone/missing-{outcome.row.row_id[-1]}.png" in (outcome.error or "")
            assert "404" in (outcome.error or "")
            assert outcome.attempts == 0 and outcome.request_id is None
        assert runner.counters.final_failures == 3
    assert fast_emulator.state.counters.jobs_created == 7
    assert [o.status for o in outcomes].count("completed") == 7


async def test_a_job_that_blames_its_input_is_not_submitted_again_in_the_run(
    tmp_path: Path, fast_emulator: EmulatorServer, ledger: Ledger
) -> None:
    rows = prompt_rows(fast_emulator.base_url, "bad", 2)
    rows[0]["image_urls"] = [f"{fast_emulator.base_url}/gone/missing.png"]
    table = write_table(tmp_path, "p", rows)
    # Without the pre-flight check the API accepts the job, fails it, and bills it once.
    outcomes, runner = await _run(fast_emulator, ledger, table, check_references=False)
    assert [o.status for o in outcomes] == ["failed", "completed"]
    # The service's own words blame the input: paid once, never again in the run.
    assert (outcomes[0].error or "").startswith("failed to load image from ")
    assert outcomes[0].attempts == 1
    assert fast_emulator.state.counters.jobs_created == 2
    assert runner.counters.final_failures == 1


async def test_the_attempt_cap_keeps_the_last_real_error(
    tmp_path: Path, fast_emulator: EmulatorServer, ledger: Ledger
) -> None:
    table = write_table(tmp_path, "p", prompt_rows(fast_emulator.base_url, "cap", 1))
    fast_emulator.state.faults.update(fail_rate=1.0)
    outcomes, _ = await _run(fast_emulator, ledger, table, attempts_per_run=2, max_attempts=2)
    assert outcomes[0].status == "failed" and outcomes[0].attempts == 2
    assert "Model run failed" in (outcomes[0].error or "")

    outcomes, runner = await _run(fast_emulator, ledger, table, max_attempts=2)
    error = outcomes[0].error or ""
    assert "Model run failed" in error and "2 of 2 paid attempts" in error
    assert fast_emulator.state.counters.jobs_created == 2
    assert runner.counters.final_failures == 1


async def test_lost_submit_answers_are_unknown_counted_and_capped(
    tmp_path: Path, fast_emulator: EmulatorServer, ledger: Ledger
) -> None:
    table = write_table(tmp_path, "p", prompt_rows(fast_emulator.base_url, "lost", 4))
    counters = fast_emulator.state.counters
    fast_emulator.state.faults.update(drop_submits=4)  # jobs created, answers lost

    outcomes, runner = await _run(fast_emulator, ledger, table)
    assert [o.status for o in outcomes] == ["failed"] * 4
    assert runner.counters.outcome_unknown == 4 and runner.counters.submitted == 0
    assert all("possible duplicate" in (o.error or "") for o in outcomes)
    assert ledger.stats("p")["unknown"] == 4
    assert counters.jobs_created == 4

    outcomes, runner = await _run(fast_emulator, ledger, table)
    assert [o.status for o in outcomes] == ["completed"] * 4
    assert runner.counters.unknown_resubmitted == 4
    assert counters.duplicate_bodies == 4 == runner.counters.unknown_resubmitted
    assert all(o.attempts == 2 for o in outcomes)  # the unknown one counts as paid


async def test_a_job_the_api_forgot_is_resubmitted_once_and_counted(
    tmp_path: Path, ledger: Ledger
) -> None:
    config = EmulatorConfig(port=0, latency=0.05, max_concurrent=4, token=TEST_TOKEN, seed=4)
    with EmulatorServer(config) as emulator:
        table = write_table(tmp_path, "p", prompt_rows(emulator.base_url, "gone", 1))
        state = emulator.state
        state.faults.update(hold_jobs=True)  # the first job cannot finish before it is lost

        async def forget_the_first_job() -> None:
            while not state.jobs:
                await asyncio.sleep(0.01)
            state.jobs.clear()  # the API no longer knows it: every call now answers 404
            state.faults.update(hold_jobs=False)

        forgetting = asyncio.ensure_future(forget_the_first_job())
        outcomes, runner = await _run(emulator, ledger, table, lost_job_grace=0.3)
        await forgetting
        assert [o.status for o in outcomes] == ["completed"]
        assert outcomes[0].attempts == 2
        assert state.counters.jobs_created == 2
        assert runner.counters.unknown_resubmitted == 1  # a possible duplicate, counted
        states = [s.state.value for s in ledger.submissions("p")]
        assert states == ["failed", "completed"]


async def test_a_followed_job_the_api_forgot_is_resubmitted_and_counted(
    tmp_path: Path, ledger: Ledger
) -> None:
    config = EmulatorConfig(port=0, latency=30.0, max_concurrent=4, token=TEST_TOKEN, seed=6)
    with EmulatorServer(config) as emulator:
        table = write_table(tmp_path, "p", prompt_rows(emulator.base_url, "kept", 1))
        state = emulator.state
        # The first run gives up waiting; the running job stays `submitted` in the ledger.
        outcomes, _ = await _run(emulator, ledger, table, job_deadline=0.5)
        assert outcomes[0].status == "failed" and "re-run will poll" in (outcomes[0].error or "")
        state.jobs.clear()  # then the API forgets it
        state.update_settings({"latency": 0.05})

        outcomes, runner = await _run(emulator, ledger, table, lost_job_grace=0.3)
        assert [o.status for o in outcomes] == ["completed"]
        assert runner.counters.polled_known == 1
        assert runner.counters.unknown_resubmitted == 1  # the followed job was lost: counted
        assert state.counters.jobs_created == 2


async def test_a_freed_account_slot_wakes_a_waiting_row_at_once(
    tmp_path: Path,
    fast_emulator: EmulatorServer,
    ledger: Ledger,
) -> None:
    # Rows that find the account full would ask again only after a minute: finishing
    # well within the test's timeout proves each freed slot woke the next row.
    minute = {"wait_first_s": 60.0, "wait_max_s": 60.0}
    table = write_table(tmp_path, "p", prompt_rows(fast_emulator.base_url, "w", 12))
    counters = fast_emulator.state.counters

    outcomes, _ = await asyncio.wait_for(
        _run(fast_emulator, ledger, table, max_concurrency=8, account_concurrency=2, **minute),
        timeout=45,
    )

    assert [outcome.status for outcome in outcomes] == ["completed"] * 12
    assert counters.jobs_created == 12
    assert counters.max_in_progress + counters.max_queue_length <= 2
