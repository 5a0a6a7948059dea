"""Two runs of one partition at once pay for each row once (issue: money under concurrency).

Real `flux2-pipeline materialize` processes, each with its own Dagster home, share one
ledger (a SQLite file in the shared output folder, or the local PostgreSQL server) and
race on the same partition; the emulator in this process counts every paid job.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger
from tests.helpers.cli import cli_env, start_cli
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

ROWS = 30


@pytest.fixture
def race_emulator() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(port=0, latency=0.5, max_concurrent=64, token=TEST_TOKEN, seed=5)
    with EmulatorServer(config) as server:
        yield server


def _env(tmp_path: Path, name: str, base_url: str, ledger_url: str) -> dict[str, str]:
    env = cli_env(tmp_path / name, base_url, FLUX2_LEDGER_URL=ledger_url)
    # One input folder and one output folder for every run; only the Dagster homes differ.
    env.update(
        FLUX2_INPUT_DIR=str(tmp_path / "prompts"),
        FLUX2_OUTPUT_DIR=str(tmp_path / "shared-output"),
        FLUX2_MAX_CONCURRENCY="16",
    )
    return env


def _results(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "shared-output" / "flux2_edits" / "race.parquet"
    return pq.read_table(path).to_pylist()


def test_two_runs_of_one_partition_pay_each_row_once(
    tmp_path: Path, race_emulator: EmulatorServer, ledger_url: str
) -> None:
    write_table(tmp_path / "prompts", "race", prompt_rows(race_emulator.base_url, "race", ROWS))
    runs = [
        start_cli(_env(tmp_path, name, race_emulator.base_url, ledger_url), "--partition", "race")
        for name in ("first", "second")
    ]
    outputs = [run.communicate(timeout=240) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stdout + stderr

    counters = race_emulator.state.counters
    assert counters.jobs_created == ROWS
    assert counters.duplicate_bodies == 0
    rows = _results(tmp_path)
    assert [row["status"] for row in rows] == ["completed"] * ROWS
    assert all(row["attempts"] == 1 for row in rows)
    with Ledger.open(ledger_url) as ledger:
        attempts = ledger.submissions("race")
    assert len(attempts) == ROWS
    assert {a.state.value for a in attempts} == {"completed"}


def test_a_killed_racer_and_a_third_run_still_pay_each_row_once(
    tmp_path: Path, race_emulator: EmulatorServer, ledger_url: str
) -> None:
    write_table(tmp_path / "prompts", "race", prompt_rows(race_emulator.base_url, "race", ROWS))
    counters = race_emulator.state.counters
    # A short lease so the third run takes the dead runner's claims over within the test.
    lease = {"FLUX2_CLAIM_LEASE_SECONDS": "3"}
    envs = [
        {**_env(tmp_path, name, race_emulator.base_url, ledger_url), **lease}
        for name in ("victim", "survivor", "third")
    ]
    victim = start_cli(envs[0], "--partition", "race")
    survivor = start_cli(envs[1], "--partition", "race")
    wait_until(lambda: counters.jobs_created >= 10, timeout=120)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    third = start_cli(envs[2], "--partition", "race")
    third_out, third_err = third.communicate(timeout=240)
    stdout, stderr = survivor.communicate(timeout=240)
    assert survivor.returncode == 0, stdout + stderr
    assert third.returncode == 0, third_out + third_err

    rows = _results(tmp_path)
    assert [row["status"] for row in rows] == ["completed"] * ROWS
    with Ledger.open(ledger_url) as ledger:
        attempts = ledger.submissions("race")
    unknown = sum(1 for a in attempts if a.state.value == "unknown")
    # The only duplicates allowed are submits the kill cut between send and answer, and
    # each of those is in the ledger as `unknown`.
    assert counters.duplicate_bodies <= unknown
    assert counters.jobs_created == ROWS + counters.duplicate_bodies
