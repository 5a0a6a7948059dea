"""Several partitions at once: `run_backfill(parallel=N)` and `flux2-pipeline materialize`.

Each partition is still its own Dagster run (its own materialization, failure and logs);
they run side by side in worker processes, so the account stays busy across partition
boundaries. A stop reaches every running partition and starts no other.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.cli.pool.server import start_worker_server
from flux2_pipeline.cli.runs import RUN_TAG
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger
from flux2_pipeline.settings import Settings
from tests.helpers.cli import CLI, cli_env, start_cli
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow


def test_partitions_run_side_by_side_each_in_its_own_run(
    settings: Settings,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUX2_MAX_CONCURRENCY", "2")
    monkeypatch.setenv("FLUX2_PARTITIONS_PER_RUN", "1")  # ranged runs: test_ranged_runs.py
    settings = Settings.from_env()
    names = ["alpha", "beta", "gamma"]
    for name in names:
        write_table(Path(settings.storage.input_dir), name, prompt_rows(emulator.base_url, name, 4))
    # The emulator holds every job until all three partitions have their two in flight:
    # run side by side, they get there; one after another, never (the release comes late
    # and the peak below stays at 2).
    counters, faults = emulator.state.counters, emulator.state.faults
    faults.update(hold_jobs=True)
    stop = threading.Event()

    def release_once_all_run() -> None:
        deadline = time.monotonic() + 120
        while counters.in_progress_now < 6 and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.02)
        faults.update(hold_jobs=False)

    releaser = threading.Thread(target=release_once_all_run, daemon=True)
    releaser.start()
    try:
        report = run_backfill(settings, select=["flux2_edits"], instance=instance, parallel=3)
    finally:
        stop.set()
        releaser.join()

    assert [(s.partition, s.succeeded, s.completed) for s in report.partitions] == [
        (name, True, 4) for name in names
    ]
    # Every partition's two jobs were in flight at once.
    assert emulator.state.counters.max_in_progress == 6
    assert emulator.state.counters.jobs_created == 12
    runs = instance.get_runs(RunsFilter(tags={RUN_TAG: "flux2-pipeline materialize"}))
    assert sorted(run.tags["dagster/partition"] for run in runs) == names
    assert {run.status for run in runs} == {DagsterRunStatus.SUCCESS}
    for name in names:
        rows = pq.read_table(Path(settings.storage.output_dir) / "flux2_edits" / f"{name}.parquet")
        assert rows.column("status").to_pylist() == ["completed"] * 4


def test_a_bad_setting_names_the_variable() -> None:
    from flux2_pipeline.resources import SettingsError

    with pytest.raises(SettingsError, match=r"^FLUX2_PARALLEL_PARTITIONS must be a whole number"):
        Settings.from_env({"FLUX2_PARALLEL_PARTITIONS": "0"})
    assert Settings.from_env({"FLUX2_PARALLEL_PARTITIONS": "8"}).parallel_partitions == 8
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"FLUX2_PARTITIONS_PER_RUN": "1001"})
    assert str(caught.value) == (
        "FLUX2_PARTITIONS_PER_RUN must be a whole number from 1 to 1000, got '1001'"
    )
    assert Settings.from_env({"FLUX2_PARTITIONS_PER_RUN": "5"}).partitions_per_run == 5
    assert Settings.from_env({}).partitions_per_run == 25


def test_sigterm_stops_every_running_partition_and_starts_no_other(tmp_path: Path) -> None:
    config = EmulatorConfig(port=0, latency=0.05, max_concurrent=2, token=TEST_TOKEN)
    with EmulatorServer(config) as emulator:
        counters = emulator.state.counters
        # The two running jobs cannot finish before the stop has cancelled the queued four,
        # however slowly the partitions start or the stop travels.
        emulator.state.faults.update(hold_jobs=True)
        env = cli_env(
            tmp_path,
            emulator.base_url,
            FLUX2_MAX_CONCURRENCY="3",
            FLUX2_STEP_RETRIES="3",
            FLUX2_PARTITIONS_PER_RUN="1",
        )
        names = ["p1", "p2", "p3", "p4"]
        for name in names:
            write_table(tmp_path / "prompts", name, prompt_rows(emulator.base_url, name, 3))

        run = start_cli(env, "--parallel", "2")
        # Two partitions of three jobs each: all six submitted, two running, four queued.
        wait_until(lambda: counters.jobs_created == 6 and counters.in_progress_now == 2)
        polls = counters.status_calls
        wait_until(lambda: counters.status_calls > polls + 2)  # both steps are polling
        run.send_signal(signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=90)
        assert run.returncode == 1, stdout + stderr
        assert "Warning" not in stderr  # the workers keep the command's warning filters
        stopped = [line for line in stdout.splitlines() if "the run was stopped" in line]
        assert sorted(line.split(":")[0] for line in stopped) == ["p1", "p2"]
        assert "p3" not in stdout and "p4" not in stdout  # never started
        assert "stopped: the remaining partitions were not started" in stdout
        assert counters.cancelled_jobs == 4  # every queued job, none twice
        assert counters.jobs_created == 6  # and no stopped step was retried

        emulator.state.faults.update(hold_jobs=False)
        rerun = subprocess.run(
            [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=180
        )
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        # The two jobs that were running are polled, not paid again; the rest are new.
        assert counters.jobs_created == 6 + 4 + 6
        with Ledger.open(tmp_path / "output" / "ledger.sqlite") as ledger:
            for name in names:
                assert ledger.stats(name)["completed"] == 3


def test_a_dead_worker_server_means_one_run_after_another(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import multiprocessing.forkserver as forkserver

    monkeypatch.setenv("FLUX2_PARTITIONS_PER_RUN", "1")
    settings = Settings.from_env()
    for name in ("one", "two"):
        write_table(Path(settings.storage.input_dir), name, prompt_rows(emulator.base_url, name, 2))
    start_worker_server()
    server = forkserver._forkserver  # type: ignore[attr-defined]
    pid = server._forkserver_pid
    # Killed and reaped by someone else (a test's cleanup once did): the server cannot
    # be asked whether it lives any more.
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    try:
        with caplog.at_level(logging.WARNING, logger="flux2_pipeline.cli.pool.server"):
            report = run_backfill(settings, select=["flux2_edits"], instance=instance, parallel=2)
        assert [(s.partition, s.succeeded) for s in report.partitions] == [
            ("one", True),
            ("two", True),
        ]
        assert "no worker processes" in caplog.text
        assert "runs go one after another" in caplog.text
    finally:
        # Forget the reaped server, so later tests in this process start a fresh one.
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
        server._forkserver_address = None
        server._forkserver_pid = None


def test_no_more_runs_start_at_once_than_the_gate_lets_in(
    settings: Settings,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Starting a run is CPU work (its planned and start events): on 2 cores, 4 runs
    # starting together each took twice as long. A run holds its place at the gate from
    # before it is created until its step starts.
    monkeypatch.setenv("FLUX2_PARTITIONS_PER_RUN", "1")
    settings = Settings.from_env()
    names = ["a", "b", "c", "d", "e"]
    for name in names:
        write_table(Path(settings.storage.input_dir), name, prompt_rows(emulator.base_url, name, 1))
    report = run_backfill(settings, select=["flux2_edits"], instance=instance, parallel=5)
    assert all(summary.succeeded for summary in report.partitions)
    starting = []  # each run: from its first event to its step's start
    for run in instance.get_runs(RunsFilter(tags={RUN_TAG: "flux2-pipeline materialize"})):
        events = instance.all_logs(run.run_id)
        step_start = next(e for e in events if e.dagster_event_type == DagsterEventType.STEP_START)
        starting.append((events[0].timestamp, step_start.timestamp))
    assert len(starting) == 5
    width = max(1, os.cpu_count() or 1)
    most_at_once = max(
        sum(1 for begin, end in starting if begin <= moment < end) for moment, _ in starting
    )
    assert most_at_once <= min(width, 5)
