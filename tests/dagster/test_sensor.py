"""flux2_prompt_files_sensor: new files become partitions and runs, changed files run again.

The sensor is evaluated with `build_sensor_context`; like the daemon, each test applies
the returned partition requests to the instance and carries the cursor forward.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import (
    DagsterInstance,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from flux2_pipeline.assets.prompts import ranged_run_key
from flux2_pipeline.batch import file_sha256
from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.sensors import Daemon, added_keys, run_requests
from tests.helpers.tables import write_table

BASE = "http://127.0.0.1:9/unused"  # sensor tests never send anything


def bump_mtime(path: Path, seconds: int = 5) -> None:
    """Move the file's mtime forward explicitly; coarse file-system clocks can't tie it."""
    stat = path.stat()
    later = stat.st_mtime_ns + seconds * 1_000_000_000
    os.utime(path, ns=(later, later))


@pytest.fixture
def daemon(instance: DagsterInstance, tmp_path: Path) -> Daemon:
    return Daemon(instance, tmp_path / "prompts", tmp_path / "output")


def test_new_changed_touched_and_added_files(daemon: Daemon) -> None:
    folder = Path(daemon.storage.input_dir)
    alpha = write_table(folder, "alpha", prompt_rows(BASE, "alpha", 3))
    alpha_sha = file_sha256(alpha)

    # A new file: one partition, one run for it, keyed by its content.
    first = daemon.tick()
    assert added_keys(first) == ["alpha"]
    (request,) = run_requests(first)
    assert request.partition_key == "alpha"
    assert request.run_key is not None and alpha_sha in request.run_key
    assert request.tags["flux2/input_sha256"] == alpha_sha
    assert daemon.partitions == ["alpha"]

    # Nothing changed: nothing requested.
    idle = daemon.tick()
    assert run_requests(idle) == []
    assert added_keys(idle) == []

    # New content (and a later mtime): one run for the same partition, new run key.
    write_table(folder, "alpha", prompt_rows(BASE, "alpha", 4))
    bump_mtime(alpha)
    new_sha = file_sha256(alpha)
    assert new_sha != alpha_sha
    changed = daemon.tick()
    assert added_keys(changed) == []
    (rerun,) = run_requests(changed)
    assert rerun.partition_key == "alpha"
    assert rerun.run_key is not None and new_sha in rerun.run_key
    assert rerun.run_key != request.run_key
    assert rerun.tags["flux2/input_sha256"] == new_sha
    assert daemon.partitions == ["alpha"]

    # Touched (mtime moves, bytes stay): hashed again, but no run.
    bump_mtime(alpha)
    touched = daemon.tick()
    assert run_requests(touched) == []
    assert added_keys(touched) == []

    # A second new file alongside: only it gets a partition and a run.
    beta = write_table(folder, "beta", prompt_rows(BASE, "beta", 2))
    second = daemon.tick()
    assert added_keys(second) == ["beta"]
    (beta_request,) = run_requests(second)
    assert beta_request.partition_key == "beta"
    assert beta_request.run_key is not None and file_sha256(beta) in beta_request.run_key
    assert daemon.partitions == ["alpha", "beta"]

    assert run_requests(daemon.tick()) == []


def test_a_name_dagster_cannot_take_is_skipped_with_a_warning(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    folder = Path(daemon.storage.input_dir)
    write_table(folder, "good", prompt_rows(BASE, "good", 2))
    write_table(folder, "bad...name", prompt_rows(BASE, "dots", 2))
    write_table(folder, "a,b", prompt_rows(BASE, "comma", 2))

    daemon.log_handler = caplog.handler
    first = daemon.tick()
    assert added_keys(first) == ["good"]
    assert [r.partition_key for r in run_requests(first)] == ["good"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bad...name.parquet" in w and "'...'" in w for w in warnings), warnings
    assert any("a,b.parquet" in w and "','" in w for w in warnings), warnings

    # The bad files never become partitions; a good file added later still goes through.
    write_table(folder, "later", prompt_rows(BASE, "later", 1))
    second = daemon.tick()
    assert added_keys(second) == ["later"]
    assert [r.partition_key for r in run_requests(second)] == ["later"]
    assert run_requests(daemon.tick()) == []
    assert daemon.partitions == ["good", "later"]


def test_a_sensor_run_request_materializes(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(Path(settings.storage.input_dir), "loop", prompt_rows(emulator.base_url, "loop", 3))
    daemon = Daemon(instance, Path(settings.storage.input_dir), settings.storage.output_root())
    (request,) = run_requests(daemon.tick())
    assert request.partition_key == "loop"

    (summary,) = run_backfill(settings, partitions=["loop"], instance=instance).partitions
    assert summary.succeeded and summary.error is None
    assert (summary.rows, summary.completed) == (3, 3)
    assert summary.results_path is not None
    rows = pq.read_table(summary.results_path).to_pylist()
    assert [row["row_id"] for row in rows] == ["loop-0", "loop-1", "loop-2"]
    assert emulator.state.counters.jobs_created == 3
    # Materializing registered nothing new and changed nothing the sensor watches.
    assert daemon.partitions == ["loop"]
    assert run_requests(daemon.tick()) == []


def test_content_changed_back_or_a_file_restored_gets_a_run_key_of_its_own(
    daemon: Daemon,
) -> None:
    """The daemon never launches a run key twice: A, B, then A again needs a third key."""
    folder = Path(daemon.storage.input_dir)
    versions = [prompt_rows(BASE, "a", 2), prompt_rows(BASE, "b", 3), prompt_rows(BASE, "a", 2)]
    path = folder / "flip.parquet"
    keys: list[str] = []
    digests: list[str] = []
    for step, rows in enumerate(versions):
        write_table(folder, "flip", rows)
        bump_mtime(path, 5 * (step + 1))
        digests.append(file_sha256(path))
        (request,) = run_requests(daemon.tick())
        assert request.run_key is not None and digests[-1] in request.run_key
        keys.append(request.run_key)
    assert digests[0] == digests[2] != digests[1]
    assert keys[0] == f"flip:{digests[0]}"  # the first version's key is the plain one
    assert len(set(keys)) == 3
    assert run_requests(daemon.tick()) == []

    # Deleted, then restored with the same bytes: a change too, under yet another key.
    path.unlink()
    assert run_requests(daemon.tick()) == []
    write_table(folder, "flip", versions[2])
    (restored,) = run_requests(daemon.tick())
    assert restored.run_key is not None and restored.run_key not in keys
    assert run_requests(daemon.tick()) == []


def test_files_arriving_together_share_ranged_runs_keyed_by_their_versions(
    daemon: Daemon,
) -> None:
    folder = Path(daemon.storage.input_dir)
    for name in ("a", "b", "c"):
        write_table(folder, name, prompt_rows(BASE, name, 2))
    digests = {name: file_sha256(folder / f"{name}.parquet") for name in "abc"}

    # Three new neighbours: one run of their range, as a UI backfill would launch.
    first = daemon.tick()
    assert added_keys(first) == ["a", "b", "c"]
    (ranged,) = run_requests(first)
    assert ranged.partition_key is None
    assert ranged.tags[ASSET_PARTITION_RANGE_START_TAG] == "a"
    assert ranged.tags[ASSET_PARTITION_RANGE_END_TAG] == "c"
    assert ranged.tags["flux2/input_files"] == "3"
    file_keys = [f"{name}:{digests[name]}" for name in "abc"]
    assert ranged.run_key == ranged_run_key("a", "c", file_keys)
    assert run_requests(daemon.tick()) == []

    # One of them changes: a run of that file alone, under its own versioned key.
    write_table(folder, "b", prompt_rows(BASE, "b", 3))
    bump_mtime(folder / "b.parquet")
    (single,) = run_requests(daemon.tick())
    assert single.partition_key == "b"
    assert single.run_key == f"b:{file_sha256(folder / 'b.parquet')}:v2"

    # Two that are not neighbours (b, unchanged, lies between): a run each, no range
    # that would run b again.
    for step, name in enumerate("ac", start=2):
        write_table(folder, name, prompt_rows(BASE, name, 4))
        bump_mtime(folder / f"{name}.parquet", 5 * step)
    requests = run_requests(daemon.tick())
    assert sorted(request.partition_key or "" for request in requests) == ["a", "c"]
    assert run_requests(daemon.tick()) == []


def test_a_ranged_run_key_changes_with_any_file_of_its_range() -> None:
    keys = ["a:1", "b:2", "c:3"]
    assert ranged_run_key("a", "c", keys) == ranged_run_key("a", "c", list(keys))
    assert ranged_run_key("a", "c", keys) != ranged_run_key("a", "c", ["a:1", "b:2:v2", "c:3"])
    assert ranged_run_key("a", "c", keys).startswith("a..c:")
