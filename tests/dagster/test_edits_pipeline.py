"""flux2_edits through a real Dagster instance against the emulator on loopback."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterInstance
from PIL import Image

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.batch import RESULTS_SCHEMA
from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.ledger import Ledger
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

RESULT_COLUMNS = [
    "row_id",
    "prompt",
    "image_urls",
    "guidance_scale",
    "seed",
    "num_inference_steps",
    "image_size",
    "num_images",
    "enable_prompt_expansion",
    "output_format",
    "request_id",
    "status",
    "output_urls",
    "error",
    "attempts",
    "submitted_at",
    "finished_at",
]


def test_three_partitions_complete_despite_429s_and_5xx(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    # A 5xx on a submit is an unknown outcome (the row fails this run, by design), so
    # submits see 429s only; status and result calls see both.
    emulator.state.faults.update(fault_429=0.1, fault_5xx=0.1, fault_5xx_on_submit=False)
    write_table(
        Path(settings.storage.input_dir), "alpha", prompt_rows(emulator.base_url, "alpha", 12)
    )
    write_table(
        Path(settings.storage.input_dir),
        "beta",
        prompt_rows(emulator.base_url, "beta", 8, num_images=2, image_size="square"),
    )
    write_table(
        Path(settings.storage.input_dir),
        "gamma",
        prompt_rows(emulator.base_url, "gamma", 5, output_format="jpeg"),
    )
    defs = settings.definitions()
    instance.add_dynamic_partitions(Flux2Keys().partitions_name, ["alpha", "beta", "gamma"])
    job = defs.resolve_implicit_global_asset_job_def()

    for key, rows in (("alpha", 12), ("beta", 8), ("gamma", 5)):
        result = job.execute_in_process(instance=instance, partition_key=key)
        assert result.success

        table = pq.read_table(settings.storage.output_root() / "flux2_edits" / f"{key}.parquet")
        assert table.schema.names[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
        assert table.schema.equals(RESULTS_SCHEMA)
        frame = table.to_pylist()
        assert [row["row_id"] for row in frame] == [f"{key}-{i}" for i in range(rows)]
        assert {row["status"] for row in frame} == {"completed"}
        assert len({row["request_id"] for row in frame}) == rows
        for row in frame:
            assert row["attempts"] == 1
            assert len(row["output_urls"]) == row["num_images"]
            assert row["error"] is None
            assert row["submitted_at"] <= row["finished_at"] <= datetime.now(UTC)

        (materialization,) = result.asset_materializations_for_node("flux2_edits")
        metadata = materialization.metadata
        assert metadata["dagster/row_count"].value == rows
        assert metadata["flux2/completed"].value == rows
        assert metadata["flux2/failed"].value == 0
        assert metadata["flux2/cost_usd"].value > 0
        # One slow job can pull the mean above the 95th percentile of a dozen: compare
        # each to what the jobs could have taken, not to each other.
        assert 0 < metadata["flux2/latency_mean_s"].value < 60
        assert 0 < metadata["flux2/latency_p95_s"].value < 60
        assert metadata["flux2/input_sha256"].value
        assert "dagster/column_schema" in metadata
        lineage = metadata["dagster/column_lineage"].value
        assert lineage.deps_by_column["prompt"][0].asset_key == AssetKey("flux2_prompt_tables")
        assert "| row_id |" in metadata["flux2/preview"].value

        evaluations = result.get_asset_check_evaluations()
        # The global job also runs flux2_images (and its checks) and the training dataset.
        edits_checks = {e.check_name for e in evaluations if e.asset_key == AssetKey("flux2_edits")}
        assert edits_checks == {
            "all_valid_rows_completed",
            "request_ids_unique",
            "no_invalid_rows",
            "completed_rows_have_all_images",
        }
        assert all(e.passed for e in evaluations)

    counters = emulator.state.counters
    assert counters.rejected_429 > 0 and counters.rejected_5xx > 0
    assert counters.duplicate_bodies == 0
    beta = pq.read_table(
        settings.storage.output_root() / "flux2_edits" / "beta.parquet"
    ).to_pylist()
    with Image.open(_fetch(beta[0]["output_urls"][1])) as image:
        assert image.size == (512, 512)


def _fetch(url: str) -> Path:
    import tempfile

    import httpx

    target = Path(tempfile.mkdtemp()) / "image"
    target.write_bytes(httpx.get(url, timeout=10).raise_for_status().content)
    return target


def test_rerun_of_a_completed_partition_pays_nothing(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(
        Path(settings.storage.input_dir), "again", prompt_rows(emulator.base_url, "again", 6)
    )
    first = run_backfill(settings, instance=instance).partitions
    created = emulator.state.counters.jobs_created
    second = run_backfill(settings, instance=instance).partitions
    assert [s.completed for s in first] == [s.completed for s in second] == [6]
    assert emulator.state.counters.jobs_created == created == 6
    event = instance.get_latest_materialization_event(AssetKey("flux2_edits"))
    assert event is not None and event.asset_materialization is not None
    assert event.asset_materialization.metadata["flux2/reused_completed"].value == 6
    assert event.asset_materialization.metadata["flux2/submitted"].value == 0


def test_failed_jobs_are_resubmitted_within_bounds_and_a_retry_clears_them(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    emulator.state.faults.update(fail_rate=1.0)
    write_table(
        Path(settings.storage.input_dir), "flaky", prompt_rows(emulator.base_url, "flaky", 4)
    )

    (failed,) = run_backfill(settings, instance=instance).partitions
    assert not failed.succeeded
    assert (failed.failed, failed.completed) == (4, 0)
    assert failed.error is not None
    assert "4 of 4 rows did not complete" in failed.error and "flaky-0" in failed.error
    rows = pq.read_table(failed.results_path).to_pylist()  # written before the step failed
    assert {row["attempts"] for row in rows} == {3}
    assert all(row["error"] == "Model run failed" for row in rows)
    assert emulator.state.counters.jobs_created == 12

    emulator.state.faults.update(fail_rate=0.0)
    (retried,) = run_backfill(settings, instance=instance, retry_failed=True).partitions
    assert retried.succeeded and retried.completed == 4
    rows = pq.read_table(retried.results_path).to_pylist()
    assert {row["attempts"] for row in rows} == {4}
    assert emulator.state.counters.jobs_created == 16

    # Nothing failed now: --retry-failed selects nothing, a plain re-run pays nothing.
    assert run_backfill(settings, instance=instance, retry_failed=True).partitions == []
    run_backfill(settings, instance=instance)
    assert emulator.state.counters.jobs_created == 16


def test_completed_rows_are_never_resubmitted_when_some_fail(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    emulator.state.faults.update(fail_rate=0.5, seed=5)
    write_table(
        Path(settings.storage.input_dir), "mixed", prompt_rows(emulator.base_url, "mixed", 20)
    )
    for _ in range(4):
        (summary,) = run_backfill(settings, instance=instance).partitions
        if summary.succeeded:
            break
        emulator.state.faults.update(fail_rate=0.0)
    assert summary.succeeded
    with Ledger.open(settings.ledger.effective_url) as ledger:
        attempts = ledger.submissions("mixed")
    completed = [a for a in attempts if a.state == "completed"]
    assert len(completed) == 20
    assert len({a.row_id for a in completed}) == 20
    rows = pq.read_table(summary.results_path).to_pylist()
    by_row = {row["row_id"]: row["attempts"] for row in rows}
    for row_id, paid in by_row.items():
        assert paid == sum(1 for a in attempts if a.row_id == row_id)
    assert emulator.state.counters.jobs_created == len(attempts)
    assert emulator.state.counters.failed_jobs == len(attempts) - 20


def test_the_attempt_ceiling_holds_across_runs(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    emulator.state.faults.update(fail_rate=1.0)
    write_table(
        Path(settings.storage.input_dir), "doomed", prompt_rows(emulator.base_url, "doomed", 1)
    )
    for _ in range(4):
        (summary,) = run_backfill(settings, instance=instance).partitions
        assert not summary.succeeded
    (row,) = pq.read_table(summary.results_path).to_pylist()
    assert row["attempts"] == 9
    assert "9 of 9 paid attempts" in row["error"]
    assert emulator.state.counters.jobs_created == 9


@pytest.mark.postgres
def test_the_ledger_can_live_in_postgresql(
    settings: Settings,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uuid

    url = "postgresql://postgres@127.0.0.1:5432/test"
    monkeypatch.setenv("FLUX2_LEDGER_URL", url)
    key = f"pg-{uuid.uuid4().hex[:10]}"
    write_table(Path(settings.storage.input_dir), key, prompt_rows(emulator.base_url, key, 5))
    pg_settings = Settings.from_env()
    try:
        (summary,) = run_backfill(pg_settings, instance=instance).partitions
        assert summary.succeeded and summary.completed == 5
        (again,) = run_backfill(pg_settings, instance=instance).partitions
        assert again.completed == 5
        assert emulator.state.counters.jobs_created == 5
        with Ledger.open(url) as ledger:
            assert ledger.stats(key)["completed"] == 5
    finally:
        from sqlalchemy import text

        with Ledger.open(url) as ledger, ledger.engine.begin() as conn:
            conn.execute(text("DELETE FROM flux2_submissions WHERE partition = :p"), {"p": key})
    assert not (settings.storage.output_root() / "ledger.sqlite").exists()


def test_the_step_retry_policy_reruns_and_pays_only_for_failed_rows(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster import DagsterEventType, RunsFilter

    monkeypatch.setenv("FLUX2_STEP_RETRIES", "1")
    monkeypatch.setenv("FLUX2_STEP_RETRY_DELAY", "0")
    settings = Settings.from_env()
    write_table(
        Path(settings.storage.input_dir), "retry", prompt_rows(emulator.base_url, "retry", 4)
    )
    # Exactly the first step attempt's 4 rows x 3 attempts fail; the step retry clears them.
    emulator.state.faults.update(fail_next=12)
    (summary,) = run_backfill(settings, instance=instance).partitions
    assert summary.succeeded and summary.completed == 4
    rows = pq.read_table(summary.results_path).to_pylist()
    assert {row["attempts"] for row in rows} == {4}
    assert emulator.state.counters.jobs_created == 16
    (record,) = instance.get_run_records(RunsFilter(tags={"dagster/partition": "retry"}))
    retries = instance.all_logs(
        record.dagster_run.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY
    )
    assert len(retries) == 1


def test_a_huge_input_row_group_is_reported(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    import pyarrow as pa

    from flux2_pipeline.batch import LARGE_ROW_GROUP_ROWS, input_shape

    # Blank prompts: every row is invalid, so the file streams through without API calls.
    rows = LARGE_ROW_GROUP_ROWS + 1
    table = pa.table(
        {
            "prompt": pa.array([""] * rows),
            "image_urls": pa.array([[f"{emulator.base_url}/samples/a.png"]] * rows),
        }
    )
    Path(settings.storage.input_dir).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, Path(settings.storage.input_dir) / "big.parquet", row_group_size=rows)
    pq.write_table(
        table, Path(settings.storage.input_dir) / "split.parquet", row_group_size=rows // 4
    )
    assert input_shape(Path(settings.storage.input_dir) / "big.parquet") == (rows, rows)

    defs = settings.definitions()
    instance.add_dynamic_partitions(Flux2Keys().partitions_name, ["big", "split"])
    job = defs.resolve_implicit_global_asset_job_def()
    edits_only = [AssetKey("flux2_edits")]
    big = job.execute_in_process(instance=instance, partition_key="big", asset_selection=edits_only)
    split = job.execute_in_process(
        instance=instance, partition_key="split", asset_selection=edits_only
    )
    assert big.success and split.success
    assert emulator.state.counters.submits_total == 0

    def row_group_warnings(run_id: str) -> list[str]:
        return [
            e.message
            for e in instance.all_logs(run_id)
            if e.level >= 30 and "row group" in e.message
        ]

    assert any(f"has a row group of {rows} rows" in m for m in row_group_warnings(big.run_id))
    assert row_group_warnings(split.run_id) == []
    (materialization,) = big.asset_materializations_for_node("flux2_edits")
    assert materialization.metadata["flux2/input_largest_row_group"].value == rows
    assert materialization.metadata["flux2/invalid"].value == rows
