"""deploy/dagster.yaml works: a PostgreSQL-backed instance with the `concurrency:` limits
materializes a partition; its queue, run by the daemon's own iterations, keeps those limits
and re-runs a failed run once; deploy/celery/dagster.yaml loads the same way."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, RunRecord, RunsFilter
from dagster._core.definitions.repository_definition import SINGLETON_REPOSITORY_NAME
from dagster._core.instance.config import PoolGranularity
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.auto_run_reexecution.event_log_consumer import EventLogConsumerDaemon
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)

from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres


def test_the_deploy_profile_runs_on_postgresql(
    tmp_path: Path,
    settings: Settings,
    emulator: EmulatorServer,
    postgres_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_database)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    write_table(Path(settings.storage.input_dir), "prod", prompt_rows(emulator.base_url, "prod", 4))

    instance = DagsterInstance.get()
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        _assert_concurrency_limits(instance)
        (summary,) = run_backfill(settings, instance=instance).partitions
        assert summary.succeeded and summary.completed == 4
        assert instance.get_dynamic_partitions("flux2_prompt_tables") == ["prod"]
        # One run for the partition (edits, images), one for the unpartitioned dataset.
        assert len(instance.get_run_records()) == 2
    finally:
        instance.dispose()


def _assert_concurrency_limits(instance: DagsterInstance, max_runs: int = 4) -> None:
    """The limits deploy/README.md explains are the ones Dagster read from the profile."""
    config = instance.get_concurrency_config()
    assert config.run_queue_config is not None
    assert config.run_queue_config.max_concurrent_runs == max_runs
    [partition_limit] = config.run_queue_config.tag_concurrency_limits
    assert partition_limit == {
        "key": "dagster/partition",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    }
    assert config.pool_config.default_pool_limit == max_runs
    assert config.pool_config.pool_granularity is PoolGranularity.RUN
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 300
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
    # A step failure is not re-run as a run: the assets' own retry policy retried it.
    assert instance.run_retries_retry_on_asset_or_op_failure is False


def test_the_celery_profile_loads_on_postgresql(
    tmp_path: Path, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "celery_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "celery" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_database)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = DagsterInstance.get()
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        _assert_concurrency_limits(instance, max_runs=8)
    finally:
        instance.dispose()


def test_the_helm_values_carry_the_same_limits_and_secrets() -> None:
    """deploy/kubernetes/values.yaml (not deployed here) says what deploy/dagster.yaml says."""
    profile = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    values = yaml.safe_load((REPO / "deploy" / "kubernetes" / "values.yaml").read_text())
    runs, pools = profile["concurrency"]["runs"], profile["concurrency"]["pools"]
    assert values["concurrency"] == {
        "enabled": True,
        "runs": {
            "maxConcurrentRuns": runs["max_concurrent_runs"],
            "tagConcurrencyLimits": runs["tag_concurrency_limits"],
        },
        "pools": {"defaultLimit": pools["default_limit"], "granularity": pools["granularity"]},
    }
    daemon = values["dagsterDaemon"]
    assert (
        daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"]
        == (profile["run_monitoring"]["free_slots_after_run_end_seconds"])
    )
    # The chart's runRetries block cannot say retry_on_asset_or_op_failure: the profile's
    # run_retries goes into the instance as written instead.
    assert daemon["runRetries"] == {"enabled": False}
    assert values["additionalInstanceConfig"]["run_retries"] == profile["run_retries"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    # The ledger URL and the token reach the code server and every run pod from a secret.
    [deployment] = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    for holder in (deployment, launcher):
        assert holder["envSecrets"] == [{"name": "flux2-secrets"}]
    assert (
        "--from-literal=FLUX2_LEDGER_URL="
        in (REPO / "deploy" / "kubernetes" / "values.yaml").read_text()
    )


# -- the run queue, run by the daemon's own code ------------------------------------------

QUEUE_LIMIT = 4  # deploy/dagster.yaml: max_concurrent_runs and the pools' default_limit
QUEUED_PARTITIONS = ("q0", "q1", "q2", "q3", "q4")
ROWS_PER_RUN = 2
LOCATION = "flux2"
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


@pytest.fixture
def deploy_home(
    tmp_path: Path, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DagsterInstance]:
    """The deploy profile's instance on a fresh PostgreSQL database; the environment run
    workers inherit (through the code server) names the same instance."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_database)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = DagsterInstance.get()
    try:
        yield instance
    finally:
        instance.dispose()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 3 min on a quiet machine, 8 under heavy load
def test_the_daemon_queue_keeps_the_deploy_profile_limits(
    tmp_path: Path,
    settings: Settings,
    emulator: EmulatorServer,
    deploy_home: DagsterInstance,
) -> None:
    """Six runs are submitted to the deploy profile's queue and started by the queue
    daemon's own iteration, through the default run launcher (a code server and one
    process per run), as `dagster-daemon run` does. While the emulator holds every job,
    the runs the daemon started cannot end: exactly four are in progress, and a second
    run of a partition waits although it was queued before others that started. Then
    everything finishes, and the run records show no moment with more than four runs,
    nor two runs of one partition. Last, a run whose step failed is not re-run by
    `run_retries` (the event-log consumer daemon): the assets' own retry policy already
    retried the step (tests/dagster/test_deploy_chart.py: a run failed otherwise is)."""
    instance = deploy_home
    for key in (*QUEUED_PARTITIONS, "retried"):
        rows = prompt_rows(emulator.base_url, key, ROWS_PER_RUN)
        write_table(Path(settings.storage.input_dir), key, rows)
    instance.add_dynamic_partitions("flux2_prompt_tables", [*QUEUED_PARTITIONS, "retried"])
    queue = QueuedRunCoordinatorDaemon(interval_seconds=1)
    retries = EventLogConsumerDaemon(interval_seconds=1)
    target = ModuleTarget(
        module_name="flux2_pipeline.definitions",
        attribute="defs",
        working_directory=str(tmp_path),
        location_name=LOCATION,
    )
    with _daemon_workspace(instance, target) as daemon_context:
        _tick(retries, daemon_context)  # its cursor starts here: later failures count

        # A run of q0, a second run of q0, then q1..q4: six runs, queued in that order.
        emulator.state.faults.update(hold_jobs=True)
        try:
            order = ["q0", "q0", "q1", "q2", "q3", "q4"]
            run_ids = [_submit(instance, daemon_context, key) for key in order]
            assert _statuses(instance, run_ids) == [DagsterRunStatus.QUEUED] * 6

            _tick(queue, daemon_context)
            first, second_q0, *others = run_ids
            started = [first, *others[:3]]  # q0, q1, q2, q3: four, the second q0 skipped
            waiting = [second_q0, others[3]]
            assert _in_progress(instance) == set(started)
            # The started runs reach the API and stay there while the emulator holds them.
            wait_until(
                lambda: emulator.state.counters.in_progress_now == QUEUE_LIMIT * ROWS_PER_RUN,
                timeout=300,
                interval=0.2,
            )
            assert {r for r in started if _status(instance, r) is DagsterRunStatus.STARTED} == set(
                started
            )
            for _ in range(3):  # the queue is full and stays so, tick after tick
                _tick(queue, daemon_context)
                assert _in_progress(instance) == set(started)
                assert _statuses(instance, waiting) == [DagsterRunStatus.QUEUED] * 2
        finally:  # also on failure, so the held runs can end and their processes exit
            emulator.state.faults.update(hold_jobs=False)

        _tick_until_finished(queue, daemon_context, instance, run_ids)
        records = instance.get_run_records(RunsFilter(run_ids=run_ids))
        assert {r.dagster_run.status for r in records} == {DagsterRunStatus.SUCCESS}
        spans = {r.dagster_run.run_id: _span(r) for r in records}
        assert _peak_overlap(list(spans.values())) == QUEUE_LIMIT
        # The two q0 runs never overlapped: the second began after the first had ended.
        assert spans[second_q0][0] >= spans[first][1]
        assert emulator.state.counters.jobs_created == 5 * ROWS_PER_RUN  # q0 ran twice, paid once

        # run_retries: a run whose step failed (the API refuses the token, after the
        # assets' own step retries) is not queued again: retry_on_asset_or_op_failure is off.
        real_token = emulator.state.config.token
        emulator.state.config.token = "a-revoked-token"
        try:
            failing = _submit(instance, daemon_context, "retried")
            _tick_until_finished(queue, daemon_context, instance, [failing])
            assert _status(instance, failing) is DagsterRunStatus.FAILURE
        finally:
            emulator.state.config.token = real_token
        _tick(retries, daemon_context)
        assert not instance.get_run_records(RunsFilter(tags={"dagster/parent_run_id": failing}))
        failed_run = instance.get_run_by_id(failing)
        assert failed_run is not None and failed_run.tags["dagster/will_retry"] == "false"
        assert len(instance.get_run_records()) == len(run_ids) + 1


@contextmanager
def _daemon_workspace(
    instance: DagsterInstance, target: ModuleTarget
) -> Iterator[WorkspaceProcessContext]:
    """The workspace a daemon loads (a code server in a subprocess). On leaving, wait for
    the processes it started (the server, run workers) to exit, so none still uses the
    database when the fixture drops it; any still running after two minutes is killed
    (a server left behind would wait on the dropped database forever)."""
    spawned: list[psutil.Process] = []
    # Processes this test process had before (another test's multiprocessing server, say)
    # are not the workspace's: never wait for or kill them.
    before = {process.pid for process in psutil.Process().children(recursive=True)}
    try:
        with WorkspaceProcessContext(instance, target) as context:
            try:
                yield context
            finally:
                spawned = [
                    process
                    for process in psutil.Process().children(recursive=True)
                    if process.pid not in before
                ]
    finally:
        _, alive = psutil.wait_procs(spawned, timeout=120)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=30)
    assert not alive, f"still running two minutes after the workspace closed: {alive}"


def _submit(instance: DagsterInstance, context: WorkspaceProcessContext, key: str) -> str:
    """Create a run of the partition job for `key` and submit it, as the UI's Launch does."""
    workspace = context.create_request_context()
    location = workspace.get_code_location(LOCATION)
    repository = location.get_repository(SINGLETON_REPOSITORY_NAME)
    remote_job = repository.get_full_job(Flux2Keys().job_name)
    plan = location.get_execution_plan(
        remote_job, {}, step_keys_to_execute=None, known_state=None, instance=instance
    )
    run = instance.create_run(
        job_name=remote_job.name,
        run_id=None,
        run_config={},
        resolved_op_selection=None,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        op_selection=None,
        status=None,
        root_run_id=None,
        parent_run_id=None,
        tags={**remote_job.tags, "dagster/partition": key},
        job_snapshot=remote_job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot,
        parent_job_snapshot=remote_job.parent_job_snapshot,
        remote_job_origin=remote_job.get_remote_origin(),
        job_code_origin=remote_job.get_python_origin(),
        asset_selection=None,
        asset_check_selection=None,
        asset_graph=repository.asset_graph,
    )
    return instance.submit_run(run.run_id, workspace).run_id


def _tick(
    daemon: QueuedRunCoordinatorDaemon | EventLogConsumerDaemon, context: WorkspaceProcessContext
) -> None:
    """One whole iteration of the daemon, as `dagster-daemon run` does every interval."""
    for _ in daemon.run_iteration(context):
        pass


def _status(instance: DagsterInstance, run_id: str) -> DagsterRunStatus:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return run.status


def _statuses(instance: DagsterInstance, run_ids: list[str]) -> list[DagsterRunStatus]:
    return [_status(instance, run_id) for run_id in run_ids]


def _in_progress(instance: DagsterInstance) -> set[str]:
    """Runs the queue counts against its limits: launched and not yet ended."""
    in_progress = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    return {
        r.dagster_run.run_id for r in instance.get_run_records(RunsFilter(statuses=in_progress))
    }


def _tick_until_finished(
    daemon: QueuedRunCoordinatorDaemon,
    context: WorkspaceProcessContext,
    instance: DagsterInstance,
    run_ids: list[str],
    timeout: float = 600,
) -> None:
    """Tick the queue, as the daemon does every interval, until every run has ended."""
    deadline = time.monotonic() + timeout
    while not all(_status(instance, run_id) in FINISHED for run_id in run_ids):
        assert time.monotonic() < deadline, f"runs not finished: {_statuses(instance, run_ids)}"
        _tick(daemon, context)
        time.sleep(0.5)  # the daemon's interval: runs progress on their own meanwhile


def _span(record: RunRecord) -> tuple[float, float]:
    assert record.start_time is not None and record.end_time is not None
    return record.start_time, record.end_time


def _peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (an end at t comes before a start at t)."""
    edges = sorted(
        [(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans],
        key=lambda edge: (edge[0], edge[1]),
    )
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return peak
