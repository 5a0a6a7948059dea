"""Dagster runs in this process, over a range of partitions or the training dataset, each
summarized (`flux2_pipeline.cli.report`); a stop (Ctrl+C, SIGTERM) is a result too."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from dagster import AssetKey, DagsterEventType, DagsterInstance, JobDefinition

from flux2_pipeline.assets.metadata import DatasetMetadata, EditsProgress
from flux2_pipeline.assets.ranges import RANGE_END_TAG, RANGE_START_TAG, plan_runs
from flux2_pipeline.cli.report import (
    DatasetSummary,
    PartitionSummary,
    first_error,
    run_metadata,
    summarize,
)

RUN_TAG = "flux2/launched_by"
"""The tag on every run the command launches (value: `flux2-pipeline materialize`)."""
RUN_TAGS = {RUN_TAG: "flux2-pipeline materialize"}

PROGRESS_POLL_SECONDS = 0.5

ProgressCallback = Callable[[str, Mapping[str, Any]], None]
"""Called with a partition key and its latest progress metadata (rows done, failed, cost)."""


class ProgressWatcher:
    """Follows runs' progress observations (rows done, failed, spend) from the event log,
    on a thread of its own, and hands each to `progress`."""

    def __init__(self, instance: DagsterInstance, progress: ProgressCallback) -> None:
        self._instance = instance
        self._progress = progress
        self._lock = threading.Lock()
        self._runs: dict[str, str] = {}
        self._cursors: dict[str, str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="flux2-progress", daemon=True)
        self._thread.start()

    def follow(self, runs: Mapping[str, str]) -> None:
        """Follow these runs (run id -> first partition) from now on, and only these."""
        with self._lock:
            self._runs = dict(runs)

    def finished(self, summary: PartitionSummary) -> None:
        """Report a partition's final figures (its run's last observation may be older)."""
        if summary.rows:
            figures = EditsProgress(
                rows_total=summary.rows,
                rows_done=summary.rows,
                rows_failed=summary.failed + summary.cancelled,
                cost_usd=summary.cost_usd,
                seconds=summary.seconds,
            )
            self._progress(summary.partition, dict(figures))

    def _follow(self) -> None:
        while not self._stop.wait(PROGRESS_POLL_SECONDS):
            with self._lock:
                runs = dict(self._runs)
            for run_id, partition in runs.items():
                self._read(run_id, partition)

    def _read(self, run_id: str, partition: str) -> None:
        try:
            page = self._instance.get_records_for_run(
                run_id,
                cursor=self._cursors.get(run_id),
                of_type=DagsterEventType.ASSET_OBSERVATION,
            )
        except Exception:  # the run may not exist yet; progress is best effort
            return
        self._cursors[run_id] = page.cursor
        for record in page.records:
            event = record.event_log_entry.dagster_event
            if event is not None and event.asset_observation_data is not None:
                observation = event.asset_observation_data.asset_observation
                metadata = {k: v.value for k, v in observation.metadata.items()}
                self._progress(observation.partition or partition, metadata)

    def stop(self) -> None:
        """End the thread (it reads nothing more)."""
        self._stop.set()
        self._thread.join(timeout=5)


def run_partitions(
    job: JobDefinition,
    instance: DagsterInstance,
    keys: Sequence[str],
    assets: Sequence[AssetKey],
    *,
    run_config: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    progress: ProgressCallback | None = None,
    subset: bool = False,
) -> list[PartitionSummary]:
    """One run of `assets` over `keys`, summarized per partition.

    `keys` is one partition, or a range: contiguous in the partitions' order (`plan_runs`).
    `subset`: `job` is already the subset to run (`JobDefinition.get_subset`), and
    `assets` only what it materializes.

    Example::

        job = defs.resolve_implicit_global_asset_job_def()
        [summary] = run_partitions(job, instance, ["cats"], [Flux2Keys().edits])
    """
    started = time.monotonic()
    run_id = run_id or str(uuid.uuid4())
    watcher = ProgressWatcher(instance, progress) if progress is not None else None
    if watcher is not None:
        watcher.follow({run_id: keys[0]})
    tags = dict(RUN_TAGS)
    if len(keys) > 1:
        tags[RANGE_START_TAG] = keys[0]
        tags[RANGE_END_TAG] = keys[-1]
    try:
        with sigterm_kept():
            result = job.execute_in_process(
                instance=instance,
                partition_key=keys[0] if len(keys) == 1 else None,
                asset_selection=None if subset else list(assets),
                raise_on_error=False,
                run_config=dict(run_config or {}),
                run_id=run_id,
                tags=tags,
            )
    except KeyboardInterrupt:
        seconds = time.monotonic() - started
        return [
            PartitionSummary(key, False, seconds, error="stopped", interrupted=True) for key in keys
        ]
    finally:
        if watcher is not None:
            watcher.stop()
    summaries = summarize(keys, assets, result, time.monotonic() - started)
    if watcher is not None:
        for summary in summaries:
            watcher.finished(summary)
    return summaries


def run_one_by_one(
    job: JobDefinition,
    instance: DagsterInstance,
    runs: Sequence[Sequence[str]],
    assets: Sequence[AssetKey],
    run_config: Mapping[str, Any],
    watcher: ProgressWatcher | None,
) -> list[PartitionSummary]:
    """`run_partitions` for each range of `runs` in turn, until one is stopped."""
    summaries: list[PartitionSummary] = []
    for keys in runs:
        run_id = str(uuid.uuid4())
        if watcher is not None:
            watcher.follow({run_id: keys[0]})
        done = run_partitions(job, instance, keys, assets, run_config=run_config, run_id=run_id)
        if watcher is not None:
            for summary in done:
                watcher.finished(summary)
        summaries.extend(done)
        if any(summary.interrupted for summary in done):
            break
    return summaries


def run_skipped_steps(
    job: JobDefinition,
    instance: DagsterInstance,
    summaries: list[PartitionSummary],
    selected: Sequence[AssetKey],
    order: Sequence[str],
    partitions_per_run: int,
    run_config: Mapping[str, Any],
) -> list[PartitionSummary]:
    """Run again, for the partitions that need it, the steps a neighbour's failure skipped.

    In a run over a range, a partition that fails stops the steps after it (the checks,
    flux2_images after flux2_edits) for every partition of the range. Those partitions'
    own steps succeeded, so the skipped ones run now, in runs of their own: the assets
    they miss, and the checks of every selected asset but those its own step evaluated.
    """
    if any(summary.interrupted for summary in summaries):
        return summaries
    waiting: dict[tuple[str, ...], list[str]] = {}
    for summary in summaries:
        if summary.blocked:
            waiting.setdefault(summary.skipped_assets, []).append(summary.partition)
    graph = job.asset_layer.asset_graph
    later: dict[str, PartitionSummary] = {}
    for names, keys in waiting.items():
        assets = [AssetKey.from_user_string(name) for name in names]
        # A check evaluated in its asset's own step (flux2_edits') already ran with it.
        checks = {
            check
            for check in graph.get_check_keys_for_assets(set(selected))
            if check.asset_key in assets
            or check not in graph.get(check.asset_key).assets_def.check_keys
        }
        steps = job.get_subset(asset_selection=set(assets), asset_check_selection=checks)
        for run in plan_runs(keys, order, partitions_per_run):
            for summary in run_partitions(
                steps, instance, run, assets, run_config=run_config, subset=True
            ):
                later[summary.partition] = summary
    return [_merged(summary, later.get(summary.partition)) for summary in summaries]


def _merged(first: PartitionSummary, later: PartitionSummary | None) -> PartitionSummary:
    """A partition's own steps' figures, with those of its steps that ran later."""
    if later is None:
        return first
    return replace(
        first,
        succeeded=later.succeeded,
        seconds=first.seconds + later.seconds,
        error=later.error,
        images=later.images,
        images_failed=later.images_failed,
        interrupted=later.interrupted,
        blocked=later.blocked,
        skipped_assets=later.skipped_assets,
    )


def run_dataset(
    job: JobDefinition,
    instance: DagsterInstance,
    assets: Sequence[AssetKey],
    run_config: Mapping[str, Any],
) -> DatasetSummary:
    """One run of the unpartitioned `assets` (the training dataset), summarized."""
    started = time.monotonic()
    try:
        with sigterm_kept():
            result = job.execute_in_process(
                instance=instance,
                asset_selection=list(assets),
                raise_on_error=False,
                run_config=dict(run_config),
                tags=dict(RUN_TAGS),
            )
    except KeyboardInterrupt:
        return DatasetSummary(False, time.monotonic() - started, error="stopped")
    seconds = time.monotonic() - started
    if not result.success:
        return DatasetSummary(False, seconds, error=first_error(result))
    metadata = run_metadata(result)
    dataset = DatasetMetadata.extract(metadata)
    return DatasetSummary(
        True,
        seconds,
        rows=int(metadata.get("dagster/row_count", 0)),
        shards=dataset.shards or 0,
        path=dataset.path.path if dataset.path else None,
    )


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """SIGTERM's handler as it was before a Dagster run in this process, once it has ended.

    A run copies SIGINT's handler to SIGTERM as it ends: in a command started in the
    background (SIGINT ignored), SIGTERM would then be ignored between runs.

    Example::

        with sigterm_kept():
            job.execute_in_process(instance=instance)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
