"""The CLI as a real process: SIGKILL mid-partition, SIGTERM (a stopped run), secrets.

These run `flux2-pipeline materialize` in a subprocess against an emulator in this
process, so the emulator's counters see every paid submission across the crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger
from tests.helpers.cli import CLI, cli_env, last_metadata, start_cli
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def slow_emulator() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(port=0, latency=1.0, max_concurrent=8, token=TEST_TOKEN, seed=3)
    with EmulatorServer(config) as server:
        yield server


def test_sigkill_mid_partition_then_rerun_pays_each_row_once(
    tmp_path: Path, slow_emulator: EmulatorServer
) -> None:
    # A short lease: the re-run takes the killed run's open rows over within seconds, not
    # after the default 60 (only one run is ever alive here).
    env = cli_env(tmp_path, slow_emulator.base_url, FLUX2_CLAIM_LEASE_SECONDS="3")
    write_table(tmp_path / "prompts", "crash", prompt_rows(slow_emulator.base_url, "crash", 24))
    counters = slow_emulator.state.counters

    victim = start_cli(env)
    # Kill while the second wave of 8 jobs is in flight: some done, some running.
    wait_until(lambda: counters.jobs_created >= 12 and counters.completed_jobs >= 4)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert counters.in_progress_now + counters.completed_jobs >= 12
    with Ledger.open(tmp_path / "output" / "ledger.sqlite") as ledger:
        states = [s.state.value for s in ledger.submissions("crash")]
    known = sum(state in ("submitted", "completed") for state in states)  # has a request id
    intents = states.count("intent")  # killed between intent and answer
    assert known + intents == len(states)

    rerun = subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    rows = pq.read_table(tmp_path / "output" / "flux2_edits" / "crash.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["completed"] * 24
    assert len({row["request_id"] for row in rows}) == 24

    metadata = last_metadata(env)
    # Rows with a request id were polled or reused, never paid again; only the rest were
    # submitted, and the rows killed between intent and answer are counted as such.
    assert metadata["flux2/polled_known"] + metadata["flux2/reused_completed"] == known  # type: ignore[operator]
    assert metadata["flux2/unknown_resubmitted"] == intents
    assert counters.jobs_created == 24 + counters.duplicate_bodies
    # A duplicate job is one of those intents whose job the API had created (the exact
    # count is proved in test_unknown_outcome.py, where the kill lands in that window).
    assert counters.duplicate_bodies <= intents
    with Ledger.open(tmp_path / "output" / "ledger.sqlite") as ledger:
        assert ledger.stats("crash")["completed"] == 24


def test_stopping_a_run_cancels_queued_jobs_and_records_them(tmp_path: Path) -> None:
    config = EmulatorConfig(port=0, latency=0.05, max_concurrent=1, token=TEST_TOKEN)
    with EmulatorServer(config) as emulator:
        counters = emulator.state.counters
        # The running job cannot finish before the stop has cancelled the queued four,
        # however slowly the stop travels.
        emulator.state.faults.update(hold_jobs=True)
        # Step retries stay on: a stop must not be undone by the RetryPolicy.
        # One partition at a time: the second must not start after a stop (the same with
        # partitions side by side is in test_parallel_partitions.py).
        env = cli_env(
            tmp_path,
            emulator.base_url,
            FLUX2_MAX_CONCURRENCY="5",
            FLUX2_STEP_RETRIES="3",
            FLUX2_PARALLEL_PARTITIONS="1",
            FLUX2_PARTITIONS_PER_RUN="1",
        )
        write_table(tmp_path / "prompts", "stopme", prompt_rows(emulator.base_url, "stop", 5))
        write_table(tmp_path / "prompts", "stopnext", prompt_rows(emulator.base_url, "n", 2))

        run = start_cli(env)
        wait_until(lambda: counters.jobs_created == 5 and counters.in_progress_now == 1)
        polls = counters.status_calls
        wait_until(lambda: counters.status_calls > polls)  # the step is polling its jobs
        run.send_signal(signal.SIGTERM)  # what stopping a run from the UI does to its worker
        stdout, _ = run.communicate(timeout=60)
        assert run.returncode == 1
        assert "stopme: partition stopme: the run was stopped after 0 of 5 rows" in stdout
        assert "stopnext" not in stdout  # the next partition was not started
        assert counters.cancelled_jobs == 4
        assert counters.jobs_created == 5  # and the stopped step was not retried

        with Ledger.open(tmp_path / "output" / "ledger.sqlite") as ledger:
            states = sorted(s.state.value for s in ledger.submissions("stopme"))
        assert states == ["cancelled"] * 4 + ["submitted"]  # the running one may still finish

        emulator.state.faults.update(hold_jobs=False)
        rerun = subprocess.run(
            [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=120
        )
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert counters.jobs_created == 11  # the running job was polled, not paid again
        assert sorted(counters.body_submissions.values()) == [1, 1, 1, 2, 2, 2, 2]


def test_the_token_never_leaves_the_authorization_header(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    write_table(tmp_path / "prompts", "secret", prompt_rows(emulator.base_url, "secret", 3))
    emulator.state.faults.update(fail_next=1, fault_429=0.2)
    env = cli_env(tmp_path, emulator.base_url)
    good = subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=120
    )
    assert good.returncode == 0, good.stdout + good.stderr

    wrong = "wrong-tok-Kd93nX0qPz"
    bad_env = cli_env(tmp_path / "bad", emulator.base_url, RUNCOMFY_API_TOKEN=wrong)
    write_table(tmp_path / "bad" / "prompts", "denied", prompt_rows(emulator.base_url, "d", 2))
    bad = subprocess.run(
        [CLI, "materialize"], env=bad_env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1
    assert "401" in bad.stdout or "400004" in bad.stdout
    assert "account or token refused (400004)" in bad.stdout

    outputs = good.stdout + good.stderr + bad.stdout + bad.stderr
    assert TEST_TOKEN not in outputs and wrong not in outputs
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".parquet") for p in files)
    assert any("ledger" in p.name for p in files)
    assert any(p.suffix == ".db" for p in files)  # the Dagster event log and run storage
    for path in files:
        data = path.read_bytes()
        assert TEST_TOKEN.encode() not in data, path
        assert wrong.encode() not in data, path


def test_emulator_command_serves_until_stopped(tmp_path: Path) -> None:
    import httpx

    # Port 0: the emulator binds a free port itself and announces it on its first line.
    server = subprocess.Popen(
        [CLI, "emulator", "--port", "0", "--latency", "0", "--token", "t0k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        announced = server.stdout.readline()
        assert announced.startswith("RunComfy emulator listening on http://127.0.0.1:"), announced
        base = announced.rsplit(" ", 1)[1].strip()

        def up() -> bool:
            try:
                return httpx.get(f"{base}/samples/x.png", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=30)
        denied = httpx.get(f"{base}/v1/requests/x/status", timeout=5)
        assert denied.status_code == 401
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0
    assert "Traceback" not in stderr
