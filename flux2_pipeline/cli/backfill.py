"""A backfill of the input folder's partitions, as `flux2-pipeline materialize` and the
demo run it: the selection, the runs over ranges (`plan_runs`, as the UI's backfills cut
them), in worker processes (`flux2_pipeline.cli.pool`) or in this one, and the report."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import DagsterInstance

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.assets.ranges import plan_runs
from flux2_pipeline.cli.instance import open_instance
from flux2_pipeline.cli.pool.launcher import run_in_workers
from flux2_pipeline.cli.pool.server import server_or_one
from flux2_pipeline.cli.report import BackfillReport
from flux2_pipeline.cli.runs import (
    ProgressCallback,
    ProgressWatcher,
    run_dataset,
    run_one_by_one,
    run_skipped_steps,
)
from flux2_pipeline.cli.selection import (
    chosen_partitions,
    failed_partitions,
    input_file_count,
    select_assets,
)
from flux2_pipeline.settings import Settings, SettingsError


def run_backfill(
    settings: Settings,
    *,
    partitions: Sequence[str] = (),
    select: Sequence[str] = (),
    retry_failed: bool = False,
    instance: DagsterInstance | None = None,
    log_level: str = "INFO",
    progress: ProgressCallback | None = None,
    parallel: int | None = None,
) -> BackfillReport:
    """Run the selected partitioned assets over ranges of partitions, then the rest once.

    Up to `parallel` (default `settings.parallel_partitions`) runs go at once, in worker
    processes; 1 runs them one after another in this process. The training dataset runs
    when selected and either named in `select` or after at least one partition. Raises
    `SettingsError` for an unknown partition or asset name.

    Example::

        report = run_backfill(settings, select=["flux2_images"], partitions=["cats"])
    """
    settings.runcomfy.check_token()
    storage = settings.storage
    problem = storage.input_dir_problem()
    if problem:
        raise SettingsError(f"FLUX2_INPUT_DIR must be a folder of Parquet files; {problem}")
    parallel = settings.parallel_partitions if parallel is None else parallel
    files = len(partitions) or input_file_count(storage)
    if min(parallel, -(-files // settings.partitions_per_run)) > 1:
        # Started now, the server imports Dagster while this process scans the inputs.
        parallel = server_or_one(parallel)
    defs = settings.definitions()
    selection = select_assets(defs, select)
    instance = instance or open_instance(settings)
    chosen, scan = chosen_partitions(instance, storage, partitions)
    if retry_failed and selection.partitioned:
        chosen = failed_partitions(instance, defs, chosen, selection.partitioned)
    job = defs.resolve_implicit_global_asset_job_def()
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    keys = chosen if selection.partitioned else []
    order = instance.get_dynamic_partitions(Flux2Keys().partitions_name)
    runs = plan_runs(keys, order, settings.partitions_per_run)
    workers = min(parallel, len(runs))
    if workers > 1:
        workers = server_or_one(workers)
    assets = selection.partitioned
    watcher = ProgressWatcher(instance, progress) if progress is not None else None
    try:
        if workers > 1 and not instance.is_ephemeral:
            summaries = run_in_workers(
                settings, instance, runs, assets, run_config, watcher, workers
            )
        else:
            summaries = run_one_by_one(job, instance, runs, assets, run_config, watcher)
        summaries = run_skipped_steps(
            job, instance, summaries, assets, order, settings.partitions_per_run, run_config
        )
    finally:
        if watcher is not None:
            watcher.stop()
    dataset = None
    wants_dataset = selection.unpartitioned and (selection.explicit or summaries)
    if wants_dataset and not any(s.interrupted for s in summaries):
        dataset = run_dataset(job, instance, selection.unpartitioned, run_config)
    return BackfillReport(summaries, dataset, {} if partitions else scan.skipped)
