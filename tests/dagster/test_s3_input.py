"""FLUX2_INPUT_DIR=s3://bucket/prefix: prompt tables read from a real S3-compatible server.

The server is moto on 127.0.0.1 (the `s3_endpoint` / `s3_bucket` fixtures, as for the
outputs); the sensor lists the prefix, `run_backfill` registers a partition per object and
runs edits, images and the training dataset against the emulator, and the content's sha256
keys runs and metadata. The S3 secret key never reaches a log, a tag or metadata.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    RunRequest,
    SensorResult,
    build_sensor_context,
    serialize_value,
)

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.assets.prompts import input_run_key, ranged_run_key
from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.paths import as_path
from flux2_pipeline.resources import Flux2Storage
from flux2_pipeline.settings import Settings
from tests.helpers.component import load_project
from tests.helpers.emulator import TEST_TOKEN, prompt_rows

s3fs = pytest.importorskip("s3fs")

SECRET = "s3-secret-Zq81xw0LkP4"
CLI = Path(sys.executable).with_name("flux2-pipeline")
EDITS = AssetKey("flux2_edits")


@pytest.fixture
def s3_input(
    settings: Settings, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The test settings with the prompt tables under `s3://<bucket>/prompts`, outputs local."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("FLUX2_INPUT_DIR", f"s3://{s3_bucket}/prompts")
    return Settings.from_env()


def put_table(bucket: str, key: str, rows: list[dict[str, Any]]) -> str:
    """Upload `rows` as `s3://<bucket>/prompts/<key>.parquet`; returns the bytes' sha256.

    Through a filesystem object of its own, as another process would: writing through the
    pipeline's (cached) one would refresh its listings for it.
    """
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    data = buffer.getvalue()
    writer = s3fs.S3FileSystem(skip_instance_cache=True)
    writer.pipe_file(f"{bucket}/prompts/{key}.parquet", data)
    return hashlib.sha256(data).hexdigest()


class Daemon:
    """Evaluates the sensor as the sensor daemon does: partitions applied, cursor kept."""

    def __init__(self, instance: DagsterInstance, settings: Settings) -> None:
        self.instance, self.settings = instance, settings
        self.cursor: str | None = None

    def tick(self) -> SensorResult:
        keys = Flux2Keys()
        context = build_sensor_context(
            instance=self.instance,
            resources={keys.resource("storage"): self.settings.storage},
            cursor=self.cursor,
        )
        sensor = self.settings.definitions().get_unresolved_sensor_def(keys.sensor_name)
        result = sensor(context)
        assert isinstance(result, SensorResult)
        for request in result.dynamic_partitions_requests or []:
            assert isinstance(request, AddDynamicPartitionsRequest)
            self.instance.add_dynamic_partitions(keys.partitions_name, request.partition_keys)
        self.cursor = result.cursor
        return result


def added(result: SensorResult) -> list[str]:
    return sorted(
        key
        for request in result.dynamic_partitions_requests or []
        if isinstance(request, AddDynamicPartitionsRequest)
        for key in request.partition_keys
    )


def runs(result: SensorResult) -> list[RunRequest]:
    return list(result.run_requests or [])


def edits_metadata(instance: DagsterInstance, key: str) -> dict[str, Any]:
    record = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=EDITS, asset_partitions=[key]), limit=1
    ).records[0]
    assert record.asset_materialization is not None
    return {name: value.value for name, value in record.asset_materialization.metadata.items()}


def test_prompt_tables_in_the_bucket_run_end_to_end(
    s3_input: Settings,
    s3_bucket: str,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    tmp_path: Path,
) -> None:
    base = emulator.base_url
    digests = {
        "alpha": put_table(s3_bucket, "alpha", prompt_rows(base, "alpha", 3)),
        "beta": put_table(s3_bucket, "beta", prompt_rows(base, "beta", 2, num_images=2)),
    }
    # Not prompt tables: another kind of object, a hidden one, one in a "sub-folder".
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{s3_bucket}/prompts/notes.txt", b"not a table")
    fs.pipe_file(f"{s3_bucket}/prompts/.draft.parquet", b"hidden")
    fs.pipe_file(f"{s3_bucket}/prompts/old/zeta.parquet", b"elsewhere")

    # The sensor lists the prefix: two partitions, one ranged run keyed by content hashes.
    daemon = Daemon(instance, s3_input)
    first = daemon.tick()
    assert added(first) == ["alpha", "beta"]
    (request,) = runs(first)
    file_keys = [input_run_key(key, digests[key], 1) for key in ("alpha", "beta")]
    assert request.run_key == ranged_run_key("alpha", "beta", file_keys)
    assert runs(daemon.tick()) == []  # unchanged objects (same ETag): nothing to run

    # `run_backfill` registers nothing new and runs edits, images and the dataset.
    report = run_backfill(s3_input, instance=instance, log_level="WARNING", parallel=1)
    assert report.succeeded, report
    assert [(s.partition, s.rows, s.completed) for s in report.partitions] == [
        ("alpha", 3, 3),
        ("beta", 2, 2),
    ]
    assert [s.images for s in report.partitions] == [3 + 3, 2 + 4]
    assert report.dataset is not None and report.dataset.rows == 3 + 4
    for key, digest in digests.items():
        metadata = edits_metadata(instance, key)
        assert metadata["flux2/input_sha256"] == digest
        assert metadata["flux2/input_path"] == f"s3://{s3_bucket}/prompts/{key}.parquet"
        results = pq.read_table(s3_input.storage.results_path(key)).to_pylist()
        assert {row["status"] for row in results} == {"completed"}
    assert emulator.state.counters.jobs_created == 5
    assert sorted(instance.get_dynamic_partitions(Flux2Keys().partitions_name)) == [
        "alpha",
        "beta",
    ]

    # A replaced object and a new one, seen by the same long-lived process: the listing
    # is asked afresh, not served from fsspec's cache.
    digests["beta"] = put_table(s3_bucket, "beta", prompt_rows(base, "beta2", 4))
    digests["gamma"] = put_table(s3_bucket, "gamma", prompt_rows(base, "gamma", 1))
    later = daemon.tick()
    assert added(later) == ["gamma"]
    (again,) = runs(later)
    file_keys = [
        input_run_key("beta", digests["beta"], 2),
        input_run_key("gamma", digests["gamma"], 1),
    ]
    assert again.run_key == ranged_run_key("beta", "gamma", file_keys)
    rerun = run_backfill(s3_input, instance=instance, log_level="WARNING", parallel=1)
    assert rerun.succeeded, rerun
    assert edits_metadata(instance, "beta")["flux2/input_sha256"] == digests["beta"]
    assert rerun.dataset is not None and rerun.dataset.rows == 3 + 4 + 1
    assert emulator.state.counters.jobs_created == 5 + 4 + 1

    # The secret key is in no run (config, tags) and no event (logs, metadata).
    for record in instance.get_run_records():
        assert SECRET not in serialize_value(record.dagster_run)
        for event in instance.all_logs(record.dagster_run.run_id):
            assert SECRET not in serialize_value(event)


def test_a_large_table_in_the_bucket_is_streamed_in_bounded_memory(
    s3_input: Settings, s3_bucket: str
) -> None:
    """48 MiB of incompressible prompts in row groups of 512 rows: the first batch comes
    after a few MiB are fetched, not the object (s3fs's own 50 MiB blocks would fetch it
    whole), and every row then streams through in less than half the object's size."""
    rows = 24_576
    prompts = [os.urandom(1024).hex() for _ in range(rows)]  # 2 KiB each
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "prompt": prompts,
            "image_urls": [["https://example.com/a.png"]] * rows,
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=512, compression="none")
    s3fs.S3FileSystem().pipe_file(f"{s3_bucket}/prompts/big.parquet", buffer.getvalue())
    assert buffer.getbuffer().nbytes > 48 << 20
    path = s3_input.storage.input_path("big")
    assert str(path) == f"s3://{s3_bucket}/prompts/big.parquet"

    # Measured in a process of its own: moto, in this one, holds and copies the object.
    script = READ_AND_MEASURE.format(uri=str(path))
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr
    seen, first_row, first_peak, peak = completed.stdout.split()
    assert (int(seen), first_row) == (rows, "r0")
    # Python's traced memory (fsspec's blocks are Python bytes): a 4 MiB block or two and
    # the decoded batches (measured: 8 MiB to the first batch, 19 MiB over all 48 batches,
    # the same for a 24 MiB object); fetching the object whole would be more than 48 MiB.
    assert int(first_peak) < 12 << 20, first_peak
    assert int(peak) < 24 << 20, peak


READ_AND_MEASURE = """
import tracemalloc
from flux2_pipeline.batch import input_shape, read_input_rows
from flux2_pipeline.paths import as_path
path = as_path("{uri}")
input_shape(path)  # first: the S3 client's own tables (about 30 MB) are loaded, once
tracemalloc.start()
batches = read_input_rows(path)
first = next(batches)
first_peak = tracemalloc.get_traced_memory()[1]
seen = len(first) + sum(len(batch) for batch in batches)
print(seen, first[0].row_id, first_peak, tracemalloc.get_traced_memory()[1])
"""


def test_cli_materialize_from_a_bucket_and_a_missing_bucket_is_a_clear_error(
    s3_input: Settings, s3_bucket: str, emulator: EmulatorServer, tmp_path: Path
) -> None:
    put_table(s3_bucket, "delta", prompt_rows(emulator.base_url, "delta", 2))
    env = {key: value for key, value in os.environ.items() if not key.startswith("DAGSTER_")}
    env["RUNCOMFY_API_TOKEN"] = TEST_TOKEN
    completed = subprocess.run(
        [str(CLI), "materialize"], env=env, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stderr
    assert "delta" in completed.stdout
    assert as_path(s3_input.storage.results_path("delta")).is_file()
    assert SECRET not in completed.stdout + completed.stderr

    env["FLUX2_INPUT_DIR"] = f"s3://{s3_bucket}-missing/prompts"
    missing = subprocess.run(
        [str(CLI), "materialize"], env=env, capture_output=True, text=True, timeout=180
    )
    assert missing.returncode == 2, missing.stderr
    assert "Traceback" not in missing.stderr
    assert f"s3://{s3_bucket}-missing/prompts names no existing bucket" in missing.stderr


def test_a_component_keeps_a_store_url_as_its_input_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL in defs.yaml (any fsspec one, not only the object stores the output may be
    in) is not taken for a folder under the project root; nothing is fetched on load."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TEST_TOKEN)
    defs = load_project(
        tmp_path,
        "type: flux2_pipeline.Flux2EditsComponent\n"
        "attributes:\n"
        "  input_dir: https://data.example.com/flux2/prompts\n"
        "  output_dir: data/output\n",
    )
    [storage] = [r for r in (defs.resources or {}).values() if isinstance(r, Flux2Storage)]
    assert storage.input_dir == "https://data.example.com/flux2/prompts"
    assert storage.output_dir == str(tmp_path / "data" / "output")
