"""Reference images given as s3:// URIs are sent as pre-signed URLs; results keep the URI."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
from dagster import DagsterInstance

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer, render_sample
from flux2_pipeline.paths import as_path, write_bytes_atomically
from flux2_pipeline.settings import Settings
from tests.helpers.tables import write_table


def test_s3_references_are_presigned_and_reruns_pay_nothing(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance, s3_bucket: str
) -> None:
    uris = [f"s3://{s3_bucket}/refs/ref-{i}.png" for i in range(2)]
    for i, uri in enumerate(uris):
        write_bytes_atomically(as_path(uri), render_sample(f"ref-{i}"))
    rows = [
        {"id": "one", "prompt": "paint it blue", "image_urls": [uris[0]]},
        {"id": "two", "prompt": "merge them", "image_urls": uris},
        {
            "id": "mixed",
            "prompt": "mix",
            "image_urls": [uris[1], f"{emulator.base_url}/samples/x.png"],
        },
        {"id": "missing", "prompt": "gone", "image_urls": [f"s3://{s3_bucket}/refs/nope.png"]},
    ]
    write_table(Path(settings.storage.input_dir), "s3refs", rows)

    (first,) = run_backfill(settings, instance=instance).partitions
    results = {row["row_id"]: row for row in pq.read_table(first.results_path).to_pylist()}
    for row_id in ("one", "two", "mixed"):
        assert results[row_id]["status"] == "completed", results[row_id]
    assert results["two"]["image_urls"] == uris  # the original URIs, not the signed URLs
    assert results["mixed"]["image_urls"][0] == uris[1]
    # A missing object is found by the pre-flight check: the row fails naming the URL (its
    # signature redacted) and nothing is paid for it.
    assert results["missing"]["status"] == "failed"
    assert "reference image cannot be fetched" in results["missing"]["error"]
    assert "nope.png" in results["missing"]["error"]
    assert (
        re.search(r"(Signature|AWSAccessKeyId)=(?!REDACTED)", results["missing"]["error"]) is None
    )
    assert results["missing"]["attempts"] == 0
    created = emulator.state.counters.jobs_created
    assert created == 3

    # New signatures on the re-run, same jobs: nothing is paid again.
    (second,) = run_backfill(settings, instance=instance).partitions
    assert emulator.state.counters.jobs_created == created
    again = {row["row_id"]: row for row in pq.read_table(second.results_path).to_pylist()}
    for row_id in ("one", "two", "mixed"):
        assert again[row_id]["request_id"] == results[row_id]["request_id"]
        assert again[row_id]["attempts"] == 1
    assert again["missing"]["attempts"] == 0
