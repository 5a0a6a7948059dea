"""A long flux2_edits step reports progress, and a stop is a result, not process-wide state.

- The step records `AssetObservation`s with rows done, failed and cost while it runs;
  `run_backfill(progress=...)` hands them to a progress bar.
- Ctrl+C during a partition ends that partition cleanly and starts no other; a second
  `run_backfill()` in the same process then runs everything (no stop flag left behind).
"""

from __future__ import annotations

import _thread
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance

from flux2_pipeline.assets import Flux2Keys, build_flux2_definitions, register_input_files
from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.cli.runs import run_partitions
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table


def test_a_running_step_records_its_progress(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUX2_MAX_CONCURRENCY", "2")
    settings = Settings.from_env()
    emulator.state.update_settings({"latency": 0.3})
    write_table(Path(settings.storage.input_dir), "slow", prompt_rows(emulator.base_url, "s", 12))
    defs = build_flux2_definitions(
        runcomfy=settings.runcomfy,
        ledger=settings.ledger,
        storage=settings.storage,
        retry_policy=None,
        progress_seconds=0.2,
    )
    keys = Flux2Keys()
    register_input_files(instance, keys, settings.storage)
    seen: list[Mapping[str, Any]] = []
    [summary] = run_partitions(
        defs.resolve_implicit_global_asset_job_def(),
        instance,
        ["slow"],
        [keys.edits],
        progress=lambda _key, figures: seen.append(figures),
    )
    assert summary.succeeded and summary.completed == 12
    records = instance.fetch_observations(keys.edits, limit=1000).records
    assert records, "no progress observation was recorded"
    observed = [
        {k: v.value for k, v in r.asset_observation.metadata.items()}  # type: ignore[union-attr]
        for r in records
    ]
    assert all(o["flux2/rows_total"] == 12 for o in observed)
    assert all(0 <= o["flux2/rows_done"] <= 12 and o["flux2/rows_failed"] == 0 for o in observed)
    assert seen and seen[-1]["flux2/rows_done"] == 12  # the bar ends full


def test_a_stop_ends_one_materialize_and_the_next_runs_everything(
    pipeline_env: dict[str, str],
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One partition per run, one after another: the second never starts (a stop in a
    # ranged run is in test_ranged_runs.py).
    monkeypatch.setenv("FLUX2_PARTITIONS_PER_RUN", "1")
    settings = Settings.from_env()
    emulator.state.update_settings({"latency": 8.0})  # outlasts the first 5 s observation
    for name in ("first", "second"):
        write_table(Path(settings.storage.input_dir), name, prompt_rows(emulator.base_url, name, 4))
    stopped = []

    def press_ctrl_c(partition: str, figures: Mapping[str, Any]) -> None:
        if not stopped and figures["flux2/rows_done"] < figures["flux2/rows_total"]:
            stopped.append(partition)
            _thread.interrupt_main()  # what Ctrl+C does, on the main thread

    report = run_backfill(
        settings, select=["flux2_edits"], instance=instance, progress=press_ctrl_c, parallel=1
    )
    assert stopped == ["first"]
    assert report.interrupted and [s.partition for s in report.partitions] == ["first"]
    assert not report.partitions[0].succeeded

    emulator.state.update_settings({"latency": 0.05})
    again = run_backfill(settings, select=["flux2_edits"], instance=instance)
    assert not again.interrupted
    assert [(s.partition, s.succeeded) for s in again.partitions] == [
        ("first", True),
        ("second", True),
    ]
