"""One account-wide cap over processes: FLUX2_ACCOUNT_CONCURRENCY across partitions.

Two real `flux2-pipeline materialize` processes, each on its own partition and each allowed
8 jobs in flight, share one ledger (a SQLite file, or the local PostgreSQL server) with
`FLUX2_ACCOUNT_CONCURRENCY=12`. The emulator in this process runs up to 64 jobs at once,
so nothing ever waits in its queue and its `max_in_progress` is the most jobs the account
ever had queued or running. The emulator holds every job until the test has seen the
account full: one process alone cannot fill it, so both are in flight together by
construction, not by how fast each one started.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import OPEN_STATES, Ledger, Submission
from flux2_pipeline.runcomfy import JobState
from tests.helpers.cli import cli_env, start_cli
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

ROWS = 40
ACCOUNT_CAP = 12
PER_PROCESS = 8  # under the cap alone, over it together


@pytest.fixture
def roomy_emulator() -> Iterator[EmulatorServer]:
    """A server with more room than the account cap: it never queues, so it counts all."""
    config = EmulatorConfig(port=0, latency=0.5, max_concurrent=64, token=TEST_TOKEN, seed=11)
    with EmulatorServer(config) as server:
        yield server


def _env(tmp_path: Path, name: str, base_url: str, ledger_url: str, **extra: str) -> dict[str, str]:
    env = cli_env(tmp_path / name, base_url, FLUX2_LEDGER_URL=ledger_url)
    # One input and one output folder (and so one ledger); only the Dagster homes differ.
    env.update(
        FLUX2_INPUT_DIR=str(tmp_path / "prompts"),
        FLUX2_OUTPUT_DIR=str(tmp_path / "shared-output"),
        FLUX2_MAX_CONCURRENCY=str(PER_PROCESS),
        FLUX2_ACCOUNT_CONCURRENCY=str(ACCOUNT_CAP),
        **extra,
    )
    return env


def _only_edits(partition: str) -> tuple[str, ...]:
    # Only the paid asset: the cap is about API jobs, and two processes building the one
    # unpartitioned training dataset in a shared output folder at once is another matter.
    return ("--partition", partition, "--select", "flux2_edits")


def _write_inputs(tmp_path: Path, base_url: str) -> None:
    for key in ("alpha", "beta"):
        write_table(tmp_path / "prompts", key, prompt_rows(base_url, key, ROWS))


def _statuses(tmp_path: Path, key: str) -> list[object]:
    path = tmp_path / "shared-output" / "flux2_edits" / f"{key}.parquet"
    return [row["status"] for row in pq.read_table(path).to_pylist()]


def _live_slots(attempts: list[Submission]) -> int:
    now = datetime.now(UTC)
    return sum(
        1
        for a in attempts
        if a.state in OPEN_STATES and a.lease_until is not None and a.lease_until > now
    )


def _in_flight_by_partition(emulator: EmulatorServer) -> dict[str, int]:
    """Jobs running on the emulator now, by the partition their prompt names."""
    counts: dict[str, int] = {}
    for job in list(emulator.state.jobs.values()):
        if job.state is JobState.IN_PROGRESS:
            key = job.request.prompt.split(" ", 1)[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


def _overlapped(first: list[Submission], second: list[Submission]) -> bool:
    """True if some job of `first` was in flight while some job of `second` was."""

    def span(attempts: list[Submission]) -> tuple[datetime, datetime]:
        starts = [a.intent_at for a in attempts]
        ends = [a.finished_at or a.updated_at for a in attempts]
        return min(starts), max(ends)

    (start_a, end_a), (start_b, end_b) = span(first), span(second)
    return start_a < end_b and start_b < end_a


def test_two_processes_share_one_account_cap(
    tmp_path: Path, roomy_emulator: EmulatorServer, ledger_url: str
) -> None:
    _write_inputs(tmp_path, roomy_emulator.base_url)
    base = roomy_emulator.base_url
    counters = roomy_emulator.state.counters
    roomy_emulator.state.faults.update(hold_jobs=True)
    try:
        runs = [
            start_cli(_env(tmp_path, key, base, ledger_url), *_only_edits(key))
            for key in ("alpha", "beta")
        ]
        # Nothing ends while held: the account fills up to the cap, which takes both.
        wait_until(lambda: counters.in_progress_now >= ACCOUNT_CAP, timeout=240)
        held = _in_flight_by_partition(roomy_emulator)
    finally:
        roomy_emulator.state.faults.update(hold_jobs=False)
    outputs = [run.communicate(timeout=240) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stdout + stderr

    # Alone, each process would have 8 in flight, 16 together; the cap holds them to 12
    # and the account was full, with both processes in it.
    assert sum(held.values()) == ACCOUNT_CAP and set(held) == {"alpha", "beta"}, held
    assert counters.max_queue_length == 0
    assert counters.max_in_progress == ACCOUNT_CAP
    assert counters.jobs_created == 2 * ROWS
    assert counters.duplicate_bodies == 0
    with Ledger.open(ledger_url) as ledger:
        alpha, beta = ledger.submissions("alpha"), ledger.submissions("beta")
        assert ledger.open_attempts() == 0
    assert _overlapped(alpha, beta), "the two processes never had jobs in flight together"
    for key, attempts in (("alpha", alpha), ("beta", beta)):
        assert _statuses(tmp_path, key) == ["completed"] * ROWS
        assert len(attempts) == ROWS
        assert {a.state.value for a in attempts} == {"completed"}


def test_a_killed_process_keeps_its_jobs_slots_until_its_rerun_follows_them(
    tmp_path: Path, roomy_emulator: EmulatorServer, ledger_url: str
) -> None:
    _write_inputs(tmp_path, roomy_emulator.base_url)
    base = roomy_emulator.base_url
    # A short lease so the dead process's intents (no request id) give their slots back.
    lease = {"FLUX2_CLAIM_LEASE_SECONDS": "3"}
    # Held jobs never end, so the account fills (12: both processes' jobs) and stays full
    # until the victim is killed holding its slots, however the two starts were spread.
    roomy_emulator.state.faults.update(hold_jobs=True)
    victim = start_cli(_env(tmp_path, "victim", base, ledger_url, **lease), *_only_edits("alpha"))
    survivor = start_cli(
        _env(tmp_path, "survivor", base, ledger_url, **lease), *_only_edits("beta")
    )
    with Ledger.open(ledger_url) as ledger:
        try:
            wait_until(
                lambda: roomy_emulator.state.counters.in_progress_now >= ACCOUNT_CAP,
                timeout=240,
            )
            assert _live_slots(ledger.submissions("alpha")) >= ACCOUNT_CAP - PER_PROCESS
            assert _live_slots(ledger.submissions("beta")) >= ACCOUNT_CAP - PER_PROCESS
            victim.send_signal(signal.SIGKILL)
            victim.communicate(timeout=30)
        finally:
            roomy_emulator.state.faults.update(hold_jobs=False)
        stdout, stderr = survivor.communicate(timeout=240)
        assert survivor.returncode == 0, stdout + stderr
        # The dead process's claims lapse with their lease; its submitted jobs still run
        # at the API, so they keep their account slots until a run follows them.
        wait_until(lambda: _live_slots(ledger.submissions("alpha")) == 0, timeout=30)
        orphaned = [a for a in ledger.submissions("alpha") if a.state.value == "submitted"]
        assert ledger.open_attempts() == len(orphaned)

    counters = roomy_emulator.state.counters
    assert counters.max_queue_length == 0
    assert counters.max_in_progress <= ACCOUNT_CAP
    assert _statuses(tmp_path, "beta") == ["completed"] * ROWS

    rerun = start_cli(_env(tmp_path, "rerun", base, ledger_url, **lease), *_only_edits("alpha"))
    stdout, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stdout + stderr
    assert _statuses(tmp_path, "alpha") == ["completed"] * ROWS
    assert counters.max_in_progress <= ACCOUNT_CAP
    with Ledger.open(ledger_url) as ledger:
        attempts = ledger.submissions()
        assert ledger.open_attempts() == 0
    unknown = sum(1 for a in attempts if a.state.value == "unknown")
    # The only duplicates allowed are submits the kill cut between send and answer, and
    # each of those is in the ledger as `unknown`.
    assert counters.duplicate_bodies <= unknown
    assert counters.jobs_created == 2 * ROWS + counters.duplicate_bodies
