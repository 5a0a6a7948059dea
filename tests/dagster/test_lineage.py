"""Dagster's own lineage signals: the prompt tables' observed data version (each file's
sha256) makes flux2_edits stale when its file changes, the observation sensor records
those versions without a run, and loading the code location registers the folder's
files as partitions of DAGSTER_HOME's instance.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    AssetObservation,
    DagsterInstance,
    DefaultSensorStatus,
    Definitions,
    build_sensor_context,
    instance_for_test,
)
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from flux2_pipeline.assets import Flux2Keys, build_flux2_definitions, register_input_files
from flux2_pipeline.assets.observe import register_partitions_on_load
from flux2_pipeline.cli.runs import run_partitions
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.resources import Flux2Storage, LedgerResource, RunComfyResource
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table

KEYS = Flux2Keys()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def storage(tmp_path: Path) -> Flux2Storage:
    return Flux2Storage(input_dir=str(tmp_path / "prompts"), output_dir=str(tmp_path / "out"))


@pytest.fixture
def defs(storage: Flux2Storage, emulator: EmulatorServer) -> Definitions:
    return build_flux2_definitions(
        runcomfy=RunComfyResource(base_url=emulator.base_url, api_token=TEST_TOKEN),
        ledger=LedgerResource(storage=storage),
        storage=storage,
        retry_policy=None,
    )


def status(instance: DagsterInstance, defs: Definitions, key: str) -> tuple[StaleStatus, list[str]]:
    resolver = CachingStaleStatusResolver(
        instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
    )
    causes = resolver.get_stale_causes(KEYS.edits, key)
    return resolver.get_status(KEYS.edits, key), [
        f"{cause.reason} ({cause.dependency.asset_key.to_user_string()} {cause.dependency.partition_key})"
        for cause in causes
        if cause.dependency is not None
    ]


def observe(instance: DagsterInstance, defs: Definitions, key: str) -> None:
    """Observe the prompt tables' partition `key`, as the UI's "Observe" does."""
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance, partition_key=key, asset_selection=[KEYS.prompt_tables]
    )
    assert result.success


def tick(instance: DagsterInstance, defs: Definitions, storage: Flux2Storage, cursor: str | None):  # type: ignore[no-untyped-def]
    """One tick of the observation sensor, its events and partitions recorded as the
    daemon records them."""
    sensor = defs.resolve_sensor_def(KEYS.observation_sensor_name)
    result = sensor(
        build_sensor_context(instance=instance, resources={"flux2_storage": storage}, cursor=cursor)
    )
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result


def test_a_changed_input_file_makes_its_edits_partition_stale_through_the_observed_version(
    storage: Flux2Storage, defs: Definitions, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    folder = Path(storage.input_dir)
    cats = write_table(folder, "cats", prompt_rows(emulator.base_url, "cats", 2))
    write_table(folder, "dogs", prompt_rows(emulator.base_url, "dogs", 2))
    register_input_files(instance, KEYS, storage)
    job = defs.resolve_implicit_global_asset_job_def()
    for key in ("cats", "dogs"):
        observe(instance, defs, key)
        [summary] = run_partitions(job, instance, [key], [KEYS.edits])
        assert summary.succeeded, summary.error
    observation = instance.fetch_observations(KEYS.prompt_tables, limit=1).records[0]
    assert observation.asset_observation is not None
    assert observation.asset_observation.tags["dagster/data_version"] in {
        sha256(cats),
        sha256(folder / "dogs.parquet"),
    }
    assert status(instance, defs, "cats") == (StaleStatus.FRESH, [])

    observe(instance, defs, "cats")  # the same bytes observed again: still fresh
    assert status(instance, defs, "cats") == (StaleStatus.FRESH, [])

    write_table(folder, "cats", prompt_rows(emulator.base_url, "cats", 3))
    observe(instance, defs, "cats")
    latest = instance.fetch_observations(KEYS.prompt_tables, limit=1).records[0]
    assert latest.partition_key == "cats"
    assert latest.asset_observation is not None
    assert latest.asset_observation.tags["dagster/data_version"] == sha256(cats)
    assert status(instance, defs, "cats") == (
        StaleStatus.STALE,
        ["has a new dependency data version (flux2_prompt_tables cats)"],
    )
    assert status(instance, defs, "dogs") == (StaleStatus.FRESH, [])

    [summary] = run_partitions(job, instance, ["cats"], [KEYS.edits])
    assert summary.succeeded
    assert status(instance, defs, "cats") == (StaleStatus.FRESH, [])


def test_the_observation_sensor_observes_new_and_changed_files_without_a_run(
    storage: Flux2Storage, defs: Definitions, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    sensor = defs.resolve_sensor_def(KEYS.observation_sensor_name)
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    folder = Path(storage.input_dir)
    cats = write_table(folder, "cats", prompt_rows(emulator.base_url, "cats", 2))

    first = tick(instance, defs, storage, None)
    assert instance.get_dynamic_partitions(KEYS.partitions_name) == ["cats"]
    assert first.asset_events == []  # observed once its partition exists
    second = tick(instance, defs, storage, first.cursor)
    [event] = second.asset_events
    assert isinstance(event, AssetObservation)
    assert (event.asset_key, event.partition) == (KEYS.prompt_tables, "cats")
    assert event.tags["dagster/data_version"] == sha256(cats)
    assert tick(instance, defs, storage, second.cursor).asset_events == []
    cats.touch()  # same bytes, new modification time: hashed, not observed
    touched = tick(instance, defs, storage, second.cursor)
    assert touched.asset_events == []

    write_table(folder, "cats", prompt_rows(emulator.base_url, "cats", 5))
    [changed] = tick(instance, defs, storage, touched.cursor).asset_events
    assert isinstance(changed, AssetObservation)
    assert changed.tags["dagster/data_version"] == sha256(cats)
    assert instance.get_runs() == []
    latest = instance.fetch_observations(KEYS.prompt_tables, limit=1).records[0]
    assert latest.asset_observation is not None
    assert latest.asset_observation.tags["dagster/data_version"] == sha256(cats)


def test_loading_registers_the_folders_files_in_dagster_homes_instance(
    tmp_path: Path, storage: Flux2Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(storage.input_dir)
    for key in ("a", "b"):
        write_table(folder, key, prompt_rows("http://127.0.0.1:9", key, 1))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert register_partitions_on_load(KEYS, storage) is None  # no instance configured

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert register_partitions_on_load(KEYS, storage) == ["a", "b"]
    write_table(folder, "c", prompt_rows("http://127.0.0.1:9", "c", 1))
    assert register_partitions_on_load(KEYS, storage) == ["c"]
    with instance_for_test(temp_dir=str(home)) as instance:
        assert instance.get_dynamic_partitions(KEYS.partitions_name) == ["a", "b", "c"]


def test_a_folder_that_cannot_be_read_never_fails_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("storage: {not_a_storage: {}}\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    storage = Flux2Storage(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING):
        assert register_partitions_on_load(KEYS, storage) is None
    assert "could not register the files" in caplog.text


def test_the_prompt_tables_are_an_asset_spec_with_kinds(defs: Definitions) -> None:
    spec = next(
        spec
        for spec in defs.resolve_all_asset_specs()
        if spec.key == AssetKey("flux2_prompt_tables")
    )
    assert spec.kinds == {"parquet"}
    assert spec.partitions_def is not None


def test_a_ranged_observation_versions_each_file_of_the_range(
    storage: Flux2Storage, defs: Definitions, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    folder = Path(storage.input_dir)
    for key in ("a", "b", "c"):
        write_table(folder, key, prompt_rows(emulator.base_url, key, 1 + len(key)))
    register_input_files(instance, KEYS, storage)
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=[KEYS.prompt_tables],
        tags={
            "dagster/asset_partition_range_start": "a",
            "dagster/asset_partition_range_end": "b",
        },
    )
    assert result.success
    found = {
        record.partition_key: record.asset_observation.tags["dagster/data_version"]
        for record in instance.fetch_observations(KEYS.prompt_tables, limit=10).records
        if record.asset_observation is not None
    }
    assert found == {key: sha256(folder / f"{key}.parquet") for key in ("a", "b")}
