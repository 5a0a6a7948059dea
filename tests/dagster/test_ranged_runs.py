"""Several partitions in one run (a backfill's ranges): per-partition outcomes stay visible.

One Dagster run covers a range of partitions, so Dagster's fixed cost is paid once per
range, and the partitions' rows share one in-flight limit. Users still see each partition:
its own materialization and metadata, its own failure, its own check evaluations, and
`--retry-failed` picks exactly the partitions that did not finish.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetPartitionStatus,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
)

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.assets.ranges import PartitionOutcome, plan_runs, ranged_failure
from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.cli.runs import RUN_TAG
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.cli import CLI, cli_env, start_cli
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

KEYS = Flux2Keys()
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def _runs(instance: DagsterInstance) -> list[object]:
    return list(instance.get_runs(RunsFilter(tags={RUN_TAG: "flux2-pipeline materialize"})))


def _status(
    instance: DagsterInstance, settings: Settings, names: list[str], asset: AssetKey = KEYS.edits
) -> dict[str, object]:
    graph = settings.definitions().resolve_asset_graph()
    partitions_def = graph.get(asset).partitions_def
    assert partitions_def is not None
    found = instance.get_status_by_partition(asset, names, partitions_def) or {}
    return {name: found.get(name) for name in names}


def test_partitions_of_one_run_share_the_in_flight_limit_across_boundaries(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUX2_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("FLUX2_PARTITIONS_PER_RUN", "3")
    settings = Settings.from_env()
    emulator.state.update_settings({"latency": 0.4})
    names = ["alpha", "beta", "gamma"]
    for name in names:
        write_table(Path(settings.storage.input_dir), name, prompt_rows(emulator.base_url, name, 5))

    report = run_backfill(settings, select=["flux2_edits"], instance=instance)

    assert [(s.partition, s.succeeded, s.completed) for s in report.partitions] == [
        (name, True, 5) for name in names
    ]
    [run] = _runs(instance)
    assert (run.tags[RANGE_START], run.tags[RANGE_END]) == ("alpha", "gamma")  # type: ignore[attr-defined]
    assert run.status == DagsterRunStatus.SUCCESS  # type: ignore[attr-defined]
    # One limit for the whole run, not one per partition...
    assert emulator.state.counters.max_in_progress == 3
    # ...and the next partition's jobs start while the one before still has jobs running:
    # one partition after another would start beta only after alpha's last job ended.
    jobs = list(emulator.state.jobs.values())

    def of(name: str) -> list[object]:
        return [job for job in jobs if job.request.prompt.startswith(name)]

    alpha_last_end = max(job.finished_at for job in of("alpha"))  # type: ignore[attr-defined]
    beta_first_start = min(job.started_at for job in of("beta"))  # type: ignore[attr-defined]
    assert beta_first_start < alpha_last_end
    # Each partition has its own materialization, with its own figures.
    for name in names:
        [record] = instance.fetch_materializations(_filter(name), limit=5).records
        metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
        assert metadata["flux2/partition"].value == name
        assert metadata["flux2/completed"].value == 5
    assert set(_status(instance, settings, names).values()) == {AssetPartitionStatus.MATERIALIZED}


def _filter(name: str) -> AssetRecordsFilter:
    return AssetRecordsFilter(asset_key=KEYS.edits, asset_partitions=[name])


def test_a_failed_partition_fails_alone_and_retry_failed_runs_what_did_not_finish(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUX2_PARTITIONS_PER_RUN", "3")
    monkeypatch.setenv("FLUX2_STEP_RETRIES", "0")
    settings = Settings.from_env()
    inputs = Path(settings.storage.input_dir)
    names = ["alpha", "beta", "gamma"]
    for name in names:
        write_table(inputs, name, prompt_rows(emulator.base_url, name, 3))
    # One of beta's rows has a reference image that does not exist: beta fails, for good.
    broken = prompt_rows(emulator.base_url, "beta", 3)
    broken[1]["image_urls"] = [f"{emulator.base_url}/no-such-folder/missing.png"]
    write_table(inputs, "beta", broken)

    report = run_backfill(settings, instance=instance, select=["flux2_edits", "flux2_images"])

    by_name = {s.partition: s for s in report.partitions}
    assert [s.partition for s in report.partitions] == names
    assert not by_name["beta"].succeeded
    assert by_name["beta"].error is not None and "beta-1" in by_name["beta"].error
    assert (by_name["beta"].completed, by_name["beta"].failed) == (2, 1)
    # beta's failure skipped the images step of the whole range; alpha's and gamma's own
    # steps had succeeded, so their images ran next, in runs of their own.
    for name in ("alpha", "gamma"):
        assert (by_name[name].succeeded, by_name[name].completed) == (True, 3)
        assert by_name[name].images > 0 and by_name[name].error is None
    assert _status(instance, settings, names) == {
        "alpha": AssetPartitionStatus.MATERIALIZED,
        "beta": AssetPartitionStatus.FAILED,
        "gamma": AssetPartitionStatus.MATERIALIZED,
    }
    assert _status(instance, settings, names, KEYS.images) == {
        "alpha": AssetPartitionStatus.MATERIALIZED,
        "beta": AssetPartitionStatus.FAILED,  # planned in the failed run, never run
        "gamma": AssetPartitionStatus.MATERIALIZED,
    }
    [ranged] = [run for run in _runs(instance) if RANGE_START in run.tags]  # type: ignore[attr-defined]
    follow_ups = [run for run in _runs(instance) if RANGE_START not in run.tags]  # type: ignore[attr-defined]
    assert ranged.status == DagsterRunStatus.FAILURE  # type: ignore[attr-defined]
    assert sorted(run.tags["dagster/partition"] for run in follow_ups) == ["alpha", "gamma"]  # type: ignore[attr-defined]
    # flux2_edits' checks ran in its own step, once for each partition, beta's too (its
    # file was written): the failed check names the row. The follow-ups did not run them
    # again; they ran the checks of the images the failed range skipped.
    for check in ("all_valid_rows_completed", "no_invalid_rows"):
        history = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(KEYS.edits, check), limit=10
        )
        evaluated = {
            str(r.partition): r.event.dagster_event.event_specific_data  # type: ignore[union-attr]
            for r in history
            if r.status.value in ("SUCCEEDED", "FAILED")
        }
        assert len(evaluated) == len(history) == 4  # alpha, beta, gamma, the range's summary
        assert {key: e.passed for key, e in evaluated.items()} == {
            "alpha": True,
            "beta": check == "no_invalid_rows",
            "gamma": True,
            "None": check == "no_invalid_rows",
        }
        assert {r.run_id for r in history} == {ranged.run_id}  # type: ignore[attr-defined]
        if check == "all_valid_rows_completed":
            assert evaluated["beta"].metadata["examples"].value.startswith("beta-1: ")
    for check in ("edited_images_stored", "edited_image_sizes_match_preset"):
        history = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(KEYS.images, check), limit=10
        )
        evaluated = [r for r in history if r.status.value in ("SUCCEEDED", "FAILED")]
        assert sorted(str(r.partition) for r in evaluated) == ["alpha", "gamma"]
    paid_before = emulator.state.counters.jobs_created
    assert paid_before == 8

    write_table(inputs, "beta", prompt_rows(emulator.base_url, "beta", 3))
    again = run_backfill(
        settings, instance=instance, select=["flux2_edits", "flux2_images"], retry_failed=True
    )

    assert [(s.partition, s.succeeded) for s in again.partitions] == [("beta", True)]
    # Only beta's fixed row was paid for (its two completed rows were reused).
    assert emulator.state.counters.jobs_created == paid_before + 1
    assert set(_status(instance, settings, names).values()) == {AssetPartitionStatus.MATERIALIZED}
    nothing = run_backfill(
        settings, instance=instance, select=["flux2_edits", "flux2_images"], retry_failed=True
    )
    assert nothing.partitions == []


def test_each_partition_gets_its_own_check_evaluations(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUX2_PARTITIONS_PER_RUN", "2")
    settings = Settings.from_env()
    inputs = Path(settings.storage.input_dir)
    write_table(inputs, "clean", prompt_rows(emulator.base_url, "clean", 2))
    with_invalid = prompt_rows(emulator.base_url, "messy", 2)
    with_invalid[0]["prompt"] = ""
    write_table(inputs, "messy", with_invalid)

    report = run_backfill(settings, instance=instance, select=["flux2_edits"])

    assert [(s.partition, s.succeeded, s.invalid) for s in report.partitions] == [
        ("clean", True, 0),
        ("messy", True, 1),
    ]
    history = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(KEYS.edits, "no_invalid_rows"), limit=10
    )
    by_partition = {record.partition: record for record in history}
    assert set(by_partition) == {"clean", "messy", None}
    evaluation = by_partition["messy"].event.dagster_event.event_specific_data  # type: ignore[union-attr]
    assert not evaluation.passed and evaluation.metadata["invalid_rows"].value == 1  # type: ignore[union-attr]
    clean = by_partition["clean"].event.dagster_event.event_specific_data  # type: ignore[union-attr]
    assert clean.passed  # type: ignore[union-attr]
    summary = by_partition[None].event.dagster_event.event_specific_data  # type: ignore[union-attr]
    assert not summary.passed and summary.metadata["examples"].value == "messy"  # type: ignore[union-attr]
    for check in ("all_valid_rows_completed", "request_ids_unique"):
        records = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(KEYS.edits, check), limit=10
        )
        assert {r.partition for r in records} == {"clean", "messy", None}


def test_runs_are_ranges_of_the_chosen_partitions_in_their_order() -> None:
    order = ["a", "b", "c", "d", "e", "f", "g"]
    assert plan_runs(["a", "b", "c", "d", "e", "f", "g"], order, 3) == [
        ["a", "b", "c"],
        ["d", "e"],
        ["f", "g"],
    ]
    # A partition not chosen splits the range: a run covers every partition between its ends.
    assert plan_runs(["g", "a", "b", "d"], order, 25) == [["a", "b"], ["d"], ["g"]]
    assert plan_runs(["a", "b"], order, 1) == [["a"], ["b"]]
    assert plan_runs([], order, 3) == []


def test_a_ranged_failure_names_its_partitions_and_retries_only_if_one_may_recover() -> None:
    from dagster import Failure

    final = PartitionOutcome("b", {}, Failure(description="b broke", allow_retries=False))
    transient = PartitionOutcome(
        "d", {"flux2/completed": 2}, Failure(description="d flaked", metadata={"flux2/failed": 1})
    )
    failure = ranged_failure([final, transient], 4)
    assert failure.description == "2 of 4 partitions failed: b broke | d flaked"
    assert failure.allow_retries
    assert not ranged_failure([final], 4).allow_retries
    details = failure.metadata["flux2/partition_failures"].value  # type: ignore[attr-defined]
    assert details == {
        "b": {"error": "b broke"},
        "d": {"error": "d flaked", "flux2/completed": 2, "flux2/failed": 1},
    }


def test_a_stop_ends_every_partition_of_a_ranged_run_and_pays_nothing_twice(
    tmp_path: Path,
) -> None:
    config = EmulatorConfig(port=0, latency=1.5, max_concurrent=1, token=TEST_TOKEN)
    with EmulatorServer(config) as emulator:
        counters = emulator.state.counters
        # Step retries stay on: a stop must not be undone by the RetryPolicy.
        env = cli_env(
            tmp_path, emulator.base_url, FLUX2_MAX_CONCURRENCY="5", FLUX2_STEP_RETRIES="3"
        )
        write_table(tmp_path / "prompts", "stopme", prompt_rows(emulator.base_url, "stop", 5))
        write_table(tmp_path / "prompts", "stopnext", prompt_rows(emulator.base_url, "n", 2))

        # Running jobs never finish while held, so however long the stop takes under load,
        # the queued jobs are still queued when their cancels arrive.
        emulator.state.faults.update(hold_jobs=True)
        run = start_cli(env)
        # One run over both: stopme's five jobs hold the five slots, stopnext's rows wait.
        wait_until(lambda: counters.jobs_created == 5 and counters.in_progress_now == 1)
        polls = counters.status_calls
        wait_until(lambda: counters.status_calls > polls)
        run.send_signal(signal.SIGTERM)
        stdout, _ = run.communicate(timeout=60)
        assert run.returncode == 1
        assert "stopme: partition stopme: the run was stopped after 0 of 5 rows" in stdout
        assert "stopnext: partition stopnext: the run was stopped after 0 of 2 rows" in stdout
        assert counters.cancelled_jobs == 4
        assert counters.jobs_created == 5  # stopnext paid nothing; the step was not retried

        emulator.state.faults.update(hold_jobs=False)
        rerun = subprocess.run(
            [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=120
        )
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert counters.jobs_created == 11  # the running job was polled, not paid again
        assert sorted(counters.body_submissions.values()) == [1, 1, 1, 2, 2, 2, 2]
