"""Declarative automation: flux2_images follows each flux2_edits partition, and the
training dataset follows any partition's images, evaluated as the automation sensor does."""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterInstance, evaluate_automation_conditions

from flux2_pipeline.assets import Flux2Keys, register_input_files
from flux2_pipeline.cli.runs import run_partitions
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table


def test_images_follow_edits_and_the_dataset_follows_images(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    for name in ("auto-a", "auto-b"):
        write_table(Path(settings.storage.input_dir), name, prompt_rows(emulator.base_url, name, 2))
    defs = settings.definitions()
    keys = Flux2Keys()
    register_input_files(instance, keys, settings.storage)
    job = defs.resolve_implicit_global_asset_job_def()

    first = evaluate_automation_conditions(defs=defs, instance=instance)
    assert first.total_requested == 0  # nothing has been edited yet

    [edited] = run_partitions(job, instance, ["auto-a"], [keys.edits])
    assert edited.succeeded
    second = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert second.get_requested_partitions(keys.images) == {"auto-a"}
    assert second.get_num_requested(keys.training_dataset) == 0

    [stored] = run_partitions(job, instance, ["auto-a"], [keys.images])
    assert stored.succeeded
    third = evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
    # One partition's images are enough: auto-b, never edited, does not hold the dataset back.
    assert third.get_num_requested(keys.training_dataset) == 1
    assert third.get_num_requested(keys.images) == 0
