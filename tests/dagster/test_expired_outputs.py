"""flux2_images when the API's output URLs have expired: fresh URLs once, else `expired`.

A completed row's edited-image URL that answers 410 is fetched again from the fresh URLs
the API's `/result` gives (one call per job); if the API no longer serves it, the manifest
row is `expired`, with an error a person can act on, and nothing is submitted again.
Reference images that answer 410 stay plain failures.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetKey, DagsterInstance

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.media import EXPIRED, EXPIRED_ERROR
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table


def _edits(settings: Settings, instance: DagsterInstance, key: str) -> list[dict[str, Any]]:
    report = run_backfill(settings, select=["flux2_edits"], partitions=[key], instance=instance)
    assert report.succeeded, report
    return pq.read_table(settings.storage.results_path(key).path).to_pylist()


def _images(settings: Settings, instance: DagsterInstance, key: str) -> list[dict[str, Any]]:
    run_backfill(settings, select=["flux2_images"], partitions=[key], instance=instance, parallel=1)
    manifest = settings.storage.image_manifest_path(key)
    return pq.read_table(manifest.path).to_pylist()


def _edited(manifest: list[dict[str, Any]], row_id: str) -> dict[str, Any]:
    [record] = [r for r in manifest if r["row_id"] == row_id and r["role"] == "edited"]
    return record


def _latest_images_metadata(instance: DagsterInstance) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(AssetKey("flux2_images"))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_an_expired_output_is_fetched_from_the_fresh_url_the_api_gives(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(Path(settings.storage.input_dir), "fresh", prompt_rows(emulator.base_url, "f", 3))
    results = _edits(settings, instance, "fresh")
    gone = results[0]
    counters = emulator.state.counters
    emulator.state.update_settings(
        {"expire_outputs": [gone["request_id"]], "refresh_outputs": True}
    )
    submits, results_asked = counters.submits_total, counters.result_calls

    manifest = _images(settings, instance, "fresh")
    assert {r["status"] for r in manifest} == {"ok"}
    record = _edited(manifest, gone["row_id"])
    assert record["url"].endswith("?fresh=1")  # where the image came from
    assert (settings.storage.output_root() / record["path"]).is_file()
    assert counters.result_calls == results_asked + 1  # one /result for the one gone job
    assert counters.submits_total == submits  # nothing submitted again
    metadata = _latest_images_metadata(instance)
    assert (metadata["flux2/result_refreshes"], metadata["flux2/images_expired"]) == (1, 0)

    # The next run reuses the stored image: no download, no /result.
    fetches = counters.image_fetches
    again = _images(settings, instance, "fresh")
    assert _edited(again, gone["row_id"])["path"] == record["path"]
    assert (counters.result_calls, counters.image_fetches) == (results_asked + 1, fetches)


def test_an_output_the_api_no_longer_serves_is_expired_and_never_resubmitted(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(Path(settings.storage.input_dir), "gone", prompt_rows(emulator.base_url, "g", 3))
    results = _edits(settings, instance, "gone")
    gone = results[1]
    counters = emulator.state.counters
    emulator.state.update_settings({"expire_outputs": [gone["request_id"]]})
    submits, jobs, results_asked = (
        counters.submits_total,
        counters.jobs_created,
        counters.result_calls,
    )

    manifest = _images(settings, instance, "gone")
    record = _edited(manifest, gone["row_id"])
    assert record["status"] == EXPIRED
    assert record["error"] == EXPIRED_ERROR
    assert "paid" in record["error"] and "new spend" in record["error"]
    assert record["request_id"] == gone["request_id"]
    others = [r for r in manifest if r is not record]
    assert {r["status"] for r in others} == {"ok"}  # its reference and the other rows
    assert counters.result_calls == results_asked + 1  # asked once, then given up
    assert (counters.submits_total, counters.jobs_created) == (submits, jobs)
    metadata = _latest_images_metadata(instance)
    assert (metadata["flux2/images_expired"], metadata["flux2/images_failed"]) == (1, 0)


def test_a_reference_image_that_is_gone_is_a_plain_failure_without_a_result_call(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    rows = prompt_rows(emulator.base_url, "r", 2)
    write_table(Path(settings.storage.input_dir), "refs", rows)
    results = _edits(settings, instance, "refs")
    # A reference served by the emulator's output route, then expired: not an output of
    # this row's job, so no /result is asked and the record is a plain failure.
    source = results[0]
    rows[1]["image_urls"] = [f"{emulator.base_url}/v1/outputs/{source['request_id']}/0.png?ref=1"]
    write_table(Path(settings.storage.input_dir), "refs", rows)
    results = _edits(settings, instance, "refs")
    emulator.state.update_settings(
        {"expire_outputs": [source["request_id"]], "refresh_outputs": True}
    )
    counters = emulator.state.counters
    results_asked = counters.result_calls

    manifest = _images(settings, instance, "refs")
    [reference] = [r for r in manifest if r["row_id"] == rows[1]["id"] and r["role"] == "source"]
    assert reference["status"] == "failed"
    assert "410" in (reference["error"] or "")
    # Row 0's own output is gone too and comes back through one /result.
    assert _edited(manifest, source["row_id"])["status"] == "ok"
    assert counters.result_calls == results_asked + 1


def test_a_job_the_api_no_longer_knows_is_expired(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(Path(settings.storage.input_dir), "lost", prompt_rows(emulator.base_url, "l", 2))
    _edits(settings, instance, "lost")
    # The API has deleted the job: its output URL and its /result both answer 404.
    path = settings.storage.results_path("lost").path
    table = pq.read_table(path)
    rows = table.to_pylist()
    forgotten = str(uuid.uuid4())
    rows[0]["request_id"] = forgotten
    rows[0]["output_urls"] = [f"{emulator.base_url}/v1/outputs/{forgotten}/0.png"]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    counters = emulator.state.counters
    submits, results_asked = counters.submits_total, counters.result_calls

    manifest = _images(settings, instance, "lost")
    record = _edited(manifest, rows[0]["row_id"])
    assert (record["status"], record["error"]) == (EXPIRED, EXPIRED_ERROR)
    assert _edited(manifest, rows[1]["row_id"])["status"] == "ok"
    assert counters.result_calls == results_asked + 1
    assert counters.submits_total == submits
