"""The one window no client can close, for real: killed after the API created a job,
before its answer arrived. The re-run pays again and counts it, exactly.

The emulator creates each job, then holds its answer (`hold_submits`); the CLI is
SIGKILLed once the emulator has created every job, so each row is an intent without a
request id in the ledger.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.ledger import Ledger
from tests.helpers.cli import CLI, cli_env, last_metadata, start_cli
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

ROWS = 3


def test_killed_before_the_answer_then_rerun_counts_each_duplicate(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    counters = emulator.state.counters
    # A short lease: the re-run takes the killed run's open intents over within seconds,
    # not after the default 60 (only one run is ever alive here).
    env = cli_env(
        tmp_path,
        emulator.base_url,
        FLUX2_MAX_CONCURRENCY=str(ROWS),
        FLUX2_CLAIM_LEASE_SECONDS="3",
    )
    write_table(tmp_path / "prompts", "lost", prompt_rows(emulator.base_url, "lost", ROWS))
    emulator.state.faults.update(hold_submits=True)  # jobs are created, answers held

    victim = start_cli(env)
    wait_until(lambda: counters.jobs_created == ROWS, timeout=120)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert counters.held_submits_now == ROWS  # no answer ever left the emulator
    assert counters.jobs_created == ROWS and counters.duplicate_bodies == 0

    with Ledger.open(tmp_path / "output" / "ledger.sqlite") as ledger:
        lost = ledger.submissions("lost")
    assert sorted((s.state.value, s.request_id) for s in lost) == [("intent", None)] * ROWS

    emulator.state.faults.update(hold_submits=False)
    rerun = subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    # Every row was paid twice, and the metadata says so: never silent.
    assert counters.jobs_created == 2 * ROWS
    assert counters.duplicate_bodies == ROWS
    assert sorted(counters.body_submissions.values()) == [2] * ROWS
    metadata = last_metadata(env)
    assert metadata["flux2/unknown_resubmitted"] == counters.duplicate_bodies == ROWS
    assert metadata["flux2/polled_known"] == 0
    assert metadata["flux2/reused_completed"] == 0
    assert metadata["flux2/completed"] == ROWS

    rows = pq.read_table(tmp_path / "output" / "flux2_edits" / "lost.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["completed"] * ROWS
    assert len({row["request_id"] for row in rows}) == ROWS
