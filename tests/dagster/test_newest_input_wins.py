"""The newest input version's results win, whichever of two overlapping runs ends last.

Run 1 works on `x.parquet` (20 rows); the file is replaced (one row removed, one prompt
changed, five added) and run 2 starts on the new version. The emulator's `hold_jobs` and
`hold_submits` order the two runs' ends deterministically. Whatever the order, the results
file and the latest materialization are the new version's, run 1 fails naming the change,
and no row is paid twice. The sensor does not start a run of a partition that a run not
yet finished covers, and asks for it after that run ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.test_utils import create_run_for_test

from flux2_pipeline.assets import Flux2Keys, build_flux2_definitions, register_input_files
from flux2_pipeline.batch import file_sha256
from flux2_pipeline.cli.report import PartitionSummary
from flux2_pipeline.cli.runs import run_partitions
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.ledger import Ledger, SubmissionState
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.sensors import Daemon, run_requests
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

OLD_ROWS = 20
WAIT_S = 120.0


def _versions(base_url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Version 1: 20 rows. Version 2: the last removed, row 5's prompt changed, 5 added."""
    old = prompt_rows(base_url, "x", OLD_ROWS)
    new = [dict(row) for row in old[:-1]]
    new[5]["prompt"] = "x edit number 5, but bluer"
    new += prompt_rows(base_url, "added", 5)
    return old, new


class _Run:
    """One run of partition `x` on its own thread, with its own resources."""

    started: list[_Run] = []

    def __init__(self, settings: Settings, instance: DagsterInstance) -> None:
        _Run.started.append(self)
        defs = build_flux2_definitions(
            runcomfy=settings.runcomfy,
            ledger=settings.ledger,
            storage=settings.storage,
            retry_policy=None,
        )
        self.summary: PartitionSummary | None = None
        self.thread = threading.Thread(
            target=self._run, args=(defs.resolve_implicit_global_asset_job_def(), instance)
        )
        self.thread.start()

    def _run(self, job: Any, instance: DagsterInstance) -> None:
        [self.summary] = run_partitions(job, instance, ["x"], [Flux2Keys().edits])

    def result(self) -> PartitionSummary:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the run did not end"
        assert self.summary is not None
        return self.summary


@pytest.fixture
def runs_end(emulator: EmulatorServer, instance: DagsterInstance) -> Iterator[None]:
    """A failed assertion still lets every held job go and waits for the runs' threads,
    before the instance and the emulator they use go away."""
    yield
    emulator.state.faults.update(hold_jobs=False, hold_submits=False)
    for run in _Run.started:
        run.thread.join(WAIT_S)
    _Run.started.clear()


def _settings(monkeypatch: pytest.MonkeyPatch, concurrency: int) -> Settings:
    monkeypatch.setenv("FLUX2_MAX_CONCURRENCY", str(concurrency))
    return Settings.from_env()


def _sent(ledger_url: str, count: int) -> Callable[[], bool]:
    """True once `count` attempts of `x` have their request id in the ledger."""

    def check() -> bool:
        with Ledger.open(ledger_url) as ledger:
            attempts = ledger.submissions("x")
        return sum(1 for a in attempts if a.state is SubmissionState.SUBMITTED) >= count

    return check


def _latest_input_sha(instance: DagsterInstance) -> str | None:
    event = instance.get_latest_materialization_event(Flux2Keys().edits)
    if event is None or event.asset_materialization is None:
        return None
    return str(event.asset_materialization.metadata["flux2/input_sha256"].value)


def _assert_new_version_won(
    settings: Settings, instance: DagsterInstance, new: list[dict[str, Any]], new_sha: str
) -> None:
    results = pq.read_table(settings.storage.results_path("x").path).to_pylist()
    assert [(r["row_id"], r["prompt"]) for r in results] == [(r["id"], r["prompt"]) for r in new]
    assert {r["status"] for r in results} == {"completed"}
    assert _latest_input_sha(instance) == new_sha


def test_an_older_run_ending_last_leaves_the_newer_results(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    runs_end: None,
) -> None:
    old, new = _versions(emulator.base_url)
    state, counters = emulator.state, emulator.state.counters
    # Run 1 has room for 19 jobs: its last row (removed in version 2) waits for a slot.
    first_settings = _settings(monkeypatch, OLD_ROWS - 1)
    ledger_url = first_settings.ledger.effective_url
    input_path = write_table(Path(first_settings.storage.input_dir), "x", old)
    register_input_files(instance, Flux2Keys(), first_settings.storage)
    state.faults.update(hold_jobs=True)
    first = _Run(first_settings, instance)
    wait_until(_sent(ledger_url, OLD_ROWS - 1), "run 1's first 19 jobs", timeout=WAIT_S)

    write_table(Path(first_settings.storage.input_dir), "x", new)
    new_sha = file_sha256(input_path)
    second_settings = _settings(monkeypatch, 32)
    second = _Run(second_settings, instance)
    wait_until(_sent(ledger_url, OLD_ROWS - 1 + 6), "run 2's six new jobs", timeout=WAIT_S)
    # Every job ends, but run 1's last submit is answered only after run 2 has ended.
    state.faults.update(hold_submits=True)
    state.faults.update(hold_jobs=False)
    second_summary = second.result()
    assert second_summary.succeeded, second_summary.error
    _assert_new_version_won(second_settings, instance, new, new_sha)
    state.faults.update(hold_submits=False)

    first_summary = first.result()
    _assert_new_version_won(second_settings, instance, new, new_sha)
    assert not first_summary.succeeded
    assert first_summary.error is not None
    assert "input changed while this run was working" in first_summary.error
    assert counters.jobs_created == OLD_ROWS + 6
    assert counters.duplicate_bodies == 0


def test_an_older_run_ending_first_fails_without_writing(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    runs_end: None,
) -> None:
    old, new = _versions(emulator.base_url)
    state, counters = emulator.state, emulator.state.counters
    settings = _settings(monkeypatch, 32)
    ledger_url = settings.ledger.effective_url
    input_path = write_table(Path(settings.storage.input_dir), "x", old)
    old_sha = file_sha256(input_path)
    register_input_files(instance, Flux2Keys(), settings.storage)
    state.faults.update(hold_jobs=True)
    first = _Run(settings, instance)
    wait_until(_sent(ledger_url, OLD_ROWS), "run 1's 20 jobs", timeout=WAIT_S)

    write_table(Path(settings.storage.input_dir), "x", new)
    new_sha = file_sha256(input_path)
    # Run 2's six submits create their jobs, and their answers wait.
    state.faults.update(hold_submits=True)
    second = _Run(settings, instance)
    wait_until(lambda: counters.held_submits_now == 6, "run 2's six held submits", timeout=WAIT_S)
    state.faults.update(hold_jobs=False)
    first_summary = first.result()
    assert not first_summary.succeeded
    assert first_summary.error is not None
    assert f"input changed while this run was working (sha256 {old_sha[:12]} -> " in (
        first_summary.error
    )
    assert not settings.storage.results_path("x").exists()  # run 1 wrote nothing
    assert _latest_input_sha(instance) is None

    state.faults.update(hold_submits=False)
    second_summary = second.result()
    assert second_summary.succeeded, second_summary.error
    _assert_new_version_won(settings, instance, new, new_sha)
    # Run 1's paid rows were reused: 20 old jobs and the 6 new rows' jobs, nothing more.
    assert counters.jobs_created == OLD_ROWS + 6
    assert counters.duplicate_bodies == 0


def test_the_sensor_waits_for_a_running_run_of_the_partition_and_keeps_the_change(
    instance: DagsterInstance, tmp_path: Path
) -> None:
    base = "http://127.0.0.1:9/unused"
    daemon = Daemon(instance, tmp_path / "prompts", tmp_path / "output")
    old, new = _versions(base)
    path = write_table(tmp_path / "prompts", "x", old)
    [first] = run_requests(daemon.tick())
    assert first.partition_key == "x"
    running = create_run_for_test(
        instance,
        job_name="__ASSET_JOB",
        status=DagsterRunStatus.STARTED,
        tags={"dagster/partition": "x"},
    )

    write_table(tmp_path / "prompts", "x", new)
    assert run_requests(daemon.tick()) == []  # run 1 still covers x: no second run yet
    assert run_requests(daemon.tick()) == []  # and the change is not forgotten meanwhile

    instance.report_run_failed(running)
    [after] = run_requests(daemon.tick())
    assert after.partition_key == "x"
    assert after.tags["flux2/input_sha256"] == file_sha256(path)
    assert after.run_key != first.run_key
    assert run_requests(daemon.tick()) == []


def test_a_ranged_run_covering_the_partition_defers_it_too(
    instance: DagsterInstance, tmp_path: Path
) -> None:
    base = "http://127.0.0.1:9/unused"
    daemon = Daemon(instance, tmp_path / "prompts", tmp_path / "output")
    for name in ("a", "b", "c"):
        write_table(tmp_path / "prompts", name, prompt_rows(base, name, 2))
    daemon.tick()
    running = create_run_for_test(
        instance,
        job_name="__ASSET_JOB",
        status=DagsterRunStatus.STARTED,
        tags={"dagster/asset_partition_range_start": "a", "dagster/asset_partition_range_end": "b"},
    )
    write_table(tmp_path / "prompts", "b", prompt_rows(base, "b", 3))
    write_table(tmp_path / "prompts", "c", prompt_rows(base, "c", 3))
    [only] = run_requests(daemon.tick())
    assert only.partition_key == "c"  # b waits for the ranged run a..b
    instance.report_run_failed(running)
    [later] = run_requests(daemon.tick())
    assert later.partition_key == "b"
