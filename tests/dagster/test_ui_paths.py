"""The paths users take in the Dagster UI, run for real: a code server, run workers, the daemon.

The project's own `workspace.yaml` is loaded the way `dagster dev` loads it (a code
server process started from this test's environment). Runs are launched and stopped
through the webserver's GraphQL schema, the same mutations the UI's *Materialize* and
*Terminate* buttons send; the default run launcher starts each run in its own run-worker
process, once the run-queue daemon's own iteration has taken it off the queue. The file
sensor is evaluated by the sensor daemon's own iteration, which applies its partition
requests, skips run keys it launched before and enqueues the runs.
Every wait polls the emulator's or the instance's state; no test depends on a sleep.

- *Terminate* cancels exactly the queued jobs, starts no new one, leaves no intent or
  unknown attempt in the ledger, and the next run polls the jobs that were running.
- A sensor `RunRequest` becomes a run of `flux2_edits` for its partition with its run key
  and tags, which succeeds; the next tick launches nothing.
- A file changed A, then B, then A again runs three times, the third paying for nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunsFilter,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
)
from dagster._core.test_utils import freeze_time
from dagster._core.workspace.context import WorkspaceProcessContext, WorkspaceRequestContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)
from dagster._daemon.sensor import execute_sensor_iteration
from dagster_graphql.client.client_queries import TERMINATE_RUN_JOB_MUTATION
from dagster_graphql.test.utils import (
    execute_dagster_graphql,
    infer_sensor_selector,
    materialize_assets,
)

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.batch import file_sha256
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.ledger import Ledger, SubmissionState
from flux2_pipeline.runcomfy.models import JobState
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

# Each test starts a code server and runs up to three runs, each in run-worker and step
# processes: about 1 to 2 minutes on the loaded 2-core machine. The limit catches a hang.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"
KEYS = Flux2Keys()
EDITS = AssetKey(KEYS.edits.path)
PATIENCE = 600.0
"""How long a wait may take before the test gives up: a hang, never a slow machine."""

START_SENSOR = """
mutation StartSensor($sensorSelector: SensorSelector!) {
  startSensor(sensorSelector: $sensorSelector) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}
"""


def finished_run(instance: DagsterInstance, run_id: str) -> DagsterRun:
    """The run once it reached a terminal status."""
    holder: list[DagsterRun] = []

    def done() -> bool:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        holder[:] = [run]
        return run.is_finished

    wait_until(done, f"run {run_id} to finish", timeout=PATIENCE, interval=0.1)
    return holder[0]


def assert_still_running(instance: DagsterInstance, run_id: str) -> None:
    """Fail at once, with the run's errors, if the run ended while the test waits on it."""
    run = instance.get_run_by_id(run_id)
    assert run is not None
    if run.is_finished:
        errors = [
            record.dagster_event.message
            for record in instance.all_logs(run_id)
            if record.dagster_event is not None and record.dagster_event.is_failure
        ]
        pytest.fail(f"run {run_id} ended {run.status.value} early: {errors}")


def dequeue(workspace: WorkspaceProcessContext, run_id: str) -> None:
    """Run the run-queue daemon's iterations until it has launched run `run_id`.

    The instance's run coordinator is Dagster's default queue, as under `dagster dev`:
    the UI and the sensor daemon only enqueue, and this daemon hands each run to the
    default run launcher, which starts a run worker through the code server.
    """
    instance = workspace.instance

    def launched() -> bool:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        if run.status is not DagsterRunStatus.QUEUED:
            return True
        with QueuedRunCoordinatorDaemon(interval_seconds=1) as daemon:
            list(daemon.run_iteration(workspace))
        return False

    wait_until(launched, f"run {run_id} to leave the queue", timeout=PATIENCE, interval=0.1)


@pytest.fixture
def settings(pipeline_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The shared test settings with 6 jobs in flight per step (set before the code server
    starts, which reads the same environment)."""
    monkeypatch.setenv("FLUX2_MAX_CONCURRENCY", "6")
    return Settings.from_env()


@pytest.fixture
def workspace(settings: Settings, instance: DagsterInstance) -> Iterator[WorkspaceProcessContext]:
    """`workspace.yaml` loaded as `dagster dev` loads it, in a code server of its own.

    The code server inherits this test's environment (the emulator, the tmp folders),
    so the `Definitions` it builds are the project's own, configured from it.
    """
    with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(WORKSPACE)])) as ctx:
        request = ctx.create_request_context()
        errors = [e.load_error for e in request.get_code_location_entries().values()]
        assert errors == [None], errors
        yield ctx


def launch_from_ui(context: WorkspaceRequestContext, partition: str) -> str:
    """What the UI's *Materialize* on one partition of flux2_edits sends; the new run's id."""
    results = materialize_assets(context, [EDITS], partition_keys=[partition])
    assert isinstance(results, list) and len(results) == 1
    launched = results[0].data["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return str(launched["run"]["runId"])


def terminate_from_ui(context: WorkspaceRequestContext, run_id: str) -> None:
    """What the UI's *Terminate* sends (the default policy: a safe termination)."""
    result = execute_dagster_graphql(context, TERMINATE_RUN_JOB_MUTATION, {"runId": run_id})
    answer = result.data["terminateRun"]
    assert answer["__typename"] == "TerminateRunSuccess", answer


def jobs_in(emulator: EmulatorServer, state: JobState) -> set[str]:
    return {job.request_id for job in list(emulator.state.jobs.values()) if job.state is state}


def test_terminate_from_the_ui_cancels_queued_jobs_and_the_next_run_polls_running_ones(
    settings: Settings,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    workspace: WorkspaceProcessContext,
) -> None:
    # The step keeps 6 jobs in flight; the emulator runs 2 and queues the other 4. The
    # running ones last until the test lowers the latency, so the queue cannot move.
    assert settings.runcomfy.max_concurrency == 6
    emulator.state.update_settings({"latency": 3600.0, "max_concurrent": 2})
    rows = 10
    write_table(Path(settings.storage.input_dir), "stop", prompt_rows(emulator.base_url, "s", rows))
    instance.add_dynamic_partitions(KEYS.partitions_name, ["stop"])
    context = workspace.create_request_context()

    run_id = launch_from_ui(context, "stop")
    dequeue(workspace, run_id)
    state = emulator.state

    def six_jobs_two_running() -> bool:
        assert_still_running(instance, run_id)
        return (state.counters.jobs_created, state.in_progress, state.queue_length) == (6, 2, 4)

    wait_until(
        six_jobs_two_running,
        "6 jobs on the emulator, 2 running and 4 queued",
        timeout=PATIENCE,
        interval=0.1,
    )
    running, queued = jobs_in(emulator, JobState.IN_PROGRESS), jobs_in(emulator, JobState.IN_QUEUE)
    assert (len(running), len(queued)) == (2, 4)

    terminate_from_ui(workspace.create_request_context(), run_id)
    run = finished_run(instance, run_id)
    assert run.status is DagsterRunStatus.CANCELED

    # "Stopping a run from the UI cancels its queued jobs through the API": all four, and
    # nothing else; the running two are untouched and nothing was submitted after the stop.
    assert state.counters.cancelled_jobs == 4
    assert jobs_in(emulator, JobState.CANCELLED) == queued
    assert jobs_in(emulator, JobState.IN_PROGRESS) == running
    assert state.counters.jobs_created == 6

    # "...jobs already running are recorded": the ledger names every job it paid for, the
    # cancelled ones as cancelled, the running ones as submitted (for the next run to
    # poll); no attempt is left as an intent or an unknown outcome.
    with Ledger.open(settings.ledger.effective_url) as ledger:
        attempts = ledger.submissions("stop")
    by_state: dict[SubmissionState, set[str | None]] = {}
    for attempt in attempts:
        by_state.setdefault(attempt.state, set()).add(attempt.request_id)
    assert by_state == {SubmissionState.CANCELLED: queued, SubmissionState.SUBMITTED: running}
    stopped_event = _step_failure_metadata(instance, run_id)
    assert stopped_event.get("flux2/interrupted") is True

    # "...and polled by the next run instead of being resubmitted": the running jobs may
    # now finish; a second run from the UI pays only for the 8 rows without a live job.
    state.update_settings({"latency": 0.05, "max_concurrent": 32})
    second = launch_from_ui(workspace.create_request_context(), "stop")
    dequeue(workspace, second)
    again = finished_run(instance, second)
    assert again.status is DagsterRunStatus.SUCCESS
    assert state.counters.jobs_created == 6 + 4 + 4  # the cancelled and the never-sent rows
    assert state.counters.duplicate_bodies == 4  # exactly the cancelled jobs, sent again
    results = pq.read_table(settings.storage.results_path("stop")).to_pylist()
    assert [r["status"] for r in results] == ["completed"] * rows
    assert running <= {r["request_id"] for r in results}
    metadata = _materialization_metadata(instance, "stop")
    assert metadata["flux2/polled_known"] == 2
    assert metadata["flux2/submitted"] == 8
    assert metadata["flux2/unknown_resubmitted"] == 0
    with Ledger.open(settings.ledger.effective_url) as ledger:
        states = {a.state for a in ledger.submissions("stop")}
    assert states == {SubmissionState.CANCELLED, SubmissionState.COMPLETED}


def _step_failure_metadata(instance: DagsterInstance, run_id: str) -> dict[str, Any]:
    """The metadata of the flux2_edits step's failure in run `run_id`."""
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is not None and event.is_step_failure:
            info = event.step_failure_data.user_failure_data
            if info is not None:
                return {k: v.value for k, v in info.metadata.items()}
    pytest.fail(f"run {run_id} recorded no step failure with metadata")


def _materialization_metadata(instance: DagsterInstance, partition: str) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(EDITS)
    assert event is not None and event.asset_materialization is not None
    assert event.asset_materialization.partition == partition
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


class SensorDaemon:
    """The sensor daemon's own iteration, one tick per call, with the clock moved on.

    Each tick runs 61 s (of Dagster's clock) after the previous one, past the sensor's
    30 s minimum interval, which the daemon enforces.
    """

    def __init__(self, workspace: WorkspaceProcessContext) -> None:
        self.workspace = workspace
        self.ticks = 0
        self.log = logging.getLogger("test_ui_paths.sensor_daemon")

    def start_sensor(self) -> None:
        """Turn the file sensor on as the UI's toggle does."""
        context = self.workspace.create_request_context()
        selector = infer_sensor_selector(context, KEYS.sensor_name)
        result = execute_dagster_graphql(context, START_SENSOR, {"sensorSelector": selector})
        answer = result.data["startSensor"]
        assert answer["__typename"] == "Sensor", answer
        assert answer["sensorState"]["status"] == "RUNNING"

    def tick(self) -> None:
        self.ticks += 1
        with freeze_time(time.time() + 61 * self.ticks):
            list(execute_sensor_iteration(self.workspace, self.log, None, None))


def sensor_runs(instance: DagsterInstance) -> list[DagsterRun]:
    """Runs the file sensor launched, oldest first."""
    runs = instance.get_runs(RunsFilter(tags={SENSOR_NAME_TAG: KEYS.sensor_name}))
    return list(reversed(runs))  # the instance lists the newest first


def test_a_sensor_run_request_is_launched_by_the_daemon_and_runs_once(
    settings: Settings,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    workspace: WorkspaceProcessContext,
) -> None:
    table = write_table(
        Path(settings.storage.input_dir), "loop", prompt_rows(emulator.base_url, "loop", 3)
    )
    digest = file_sha256(table)
    daemon = SensorDaemon(workspace)
    daemon.start_sensor()
    daemon.tick()

    assert instance.get_dynamic_partitions(KEYS.partitions_name) == ["loop"]
    (run,) = sensor_runs(instance)
    dequeue(workspace, run.run_id)
    run = finished_run(instance, run.run_id)
    assert run.status is DagsterRunStatus.SUCCESS
    assert run.asset_selection == {EDITS}
    assert run.tags[PARTITION_NAME_TAG] == "loop"
    assert run.tags[RUN_KEY_TAG] == f"loop:{digest}"
    assert run.tags["flux2/input_sha256"] == digest
    assert emulator.state.counters.jobs_created == 3
    results = pq.read_table(settings.storage.results_path("loop")).to_pylist()
    assert [(r["row_id"], r["status"]) for r in results] == [
        (f"loop-{i}", "completed") for i in range(3)
    ]
    assert _materialization_metadata(instance, "loop")["flux2/input_sha256"] == digest

    # The next tick finds the file unchanged: no second run, no second payment.
    daemon.tick()
    assert [r.run_id for r in sensor_runs(instance)] == [run.run_id]
    assert emulator.state.counters.jobs_created == 3


def rewrite(path: Path, rows: list[dict[str, Any]], step: int) -> str:
    """Write `rows` over the file, its mtime `step` seconds on (a coarse clock can't tie it)."""
    write_table(path.parent, path.stem, rows)
    later = path.stat().st_mtime_ns + step * 1_000_000_000
    os.utime(path, ns=(later, later))
    return file_sha256(path)


def test_a_file_changed_back_to_earlier_content_runs_again(
    settings: Settings,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    workspace: WorkspaceProcessContext,
) -> None:
    folder = Path(settings.storage.input_dir)
    version_a = prompt_rows(emulator.base_url, "a", 2)
    version_b = prompt_rows(emulator.base_url, "b", 3)
    path = write_table(folder, "flip", version_a)
    daemon = SensorDaemon(workspace)
    daemon.start_sensor()

    def tick_and_finish(expected_runs: int) -> DagsterRun:
        daemon.tick()
        runs = sensor_runs(instance)
        assert len(runs) == expected_runs, [r.tags.get(RUN_KEY_TAG) for r in runs]
        dequeue(workspace, runs[-1].run_id)
        run = finished_run(instance, runs[-1].run_id)
        assert run.status is DagsterRunStatus.SUCCESS
        return run

    def result_ids() -> list[str]:
        table = pq.read_table(settings.storage.results_path("flip"))
        return [str(row_id) for row_id in table.column("row_id").to_pylist()]

    first = tick_and_finish(1)
    digest_a = first.tags["flux2/input_sha256"]
    assert result_ids() == ["a-0", "a-1"]

    digest_b = rewrite(path, version_b, 5)
    second = tick_and_finish(2)
    assert second.tags["flux2/input_sha256"] == digest_b
    assert result_ids() == ["b-0", "b-1", "b-2"]

    # Back to the first content: the partition's results hold B's rows, so this is a
    # change like any other and must run, though A's bytes (and hash) ran before.
    assert rewrite(path, version_a, 10) == digest_a
    third = tick_and_finish(3)
    assert third.tags["flux2/input_sha256"] == digest_a
    assert len({run.tags[RUN_KEY_TAG] for run in (first, second, third)}) == 3
    assert result_ids() == ["a-0", "a-1"]
    # The ledger still has A's completed jobs: running A again paid for nothing new.
    assert emulator.state.counters.jobs_created == 2 + 3
    assert _materialization_metadata(instance, "flip")["flux2/reused_completed"] == 2

    daemon.tick()  # unchanged since: nothing more
    assert len(sensor_runs(instance)) == 3


def test_files_dropped_together_are_one_ranged_run_launched_by_the_daemon(
    settings: Settings,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    workspace: WorkspaceProcessContext,
) -> None:
    folder = Path(settings.storage.input_dir)
    names = ["drop-a", "drop-b", "drop-c"]
    digests = {
        name: file_sha256(write_table(folder, name, prompt_rows(emulator.base_url, name, 2)))
        for name in names
    }
    daemon = SensorDaemon(workspace)
    daemon.start_sensor()
    daemon.tick()

    assert instance.get_dynamic_partitions(KEYS.partitions_name) == names
    (run,) = sensor_runs(instance)
    assert run.tags[ASSET_PARTITION_RANGE_START_TAG] == "drop-a"
    assert run.tags[ASSET_PARTITION_RANGE_END_TAG] == "drop-c"
    assert PARTITION_NAME_TAG not in run.tags
    dequeue(workspace, run.run_id)
    run = finished_run(instance, run.run_id)
    assert run.status is DagsterRunStatus.SUCCESS
    assert run.asset_selection == {EDITS}
    # Each file is a partition of its own in the UI: its own materialization and results.
    materialized = instance.get_materialized_partitions(EDITS)
    assert materialized == set(names)
    for name in names:
        results = pq.read_table(settings.storage.results_path(name)).to_pylist()
        assert [r["status"] for r in results] == ["completed", "completed"]
        record = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=EDITS, asset_partitions=[name]), limit=1
        ).records[0]
        assert record.asset_materialization is not None
        metadata = record.asset_materialization.metadata
        assert metadata["flux2/input_sha256"].value == digests[name]
    assert emulator.state.counters.jobs_created == 6

    # Nothing changed: no second run, nothing paid twice.
    daemon.tick()
    assert [r.run_id for r in sensor_runs(instance)] == [run.run_id]
    assert emulator.state.counters.jobs_created == 6
