"""Materialize partitions through the project's `Definitions`, one run per partition.

This is what `flux2-pipeline materialize` and the demo call. It registers input files as
partitions with the sensor's own code, resolves asset names against the `Definitions`, runs
each selected partition with `run_partition` (one self-contained function, so partitions
could run side by side from a pool), and summarizes every run from its materialization and
failure metadata. The instance is DAGSTER_HOME's, or one kept under a local output folder
(or `~/.flux2-pipeline/dagster/<digest of the URI>` for an object-store output); its
first-time setup is serialized by a file lock, so two commands on a new folder both work.

Example::

    report = materialize(Settings.from_env(), partitions=["cats"])
    print(format_report(report))
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    ExecuteInProcessResult,
    JobDefinition,
    RunsFilter,
)
from dagster_shared.error import SerializableErrorInfo
from filelock import FileLock

from flux2_pipeline.assets import INTERRUPTED, Flux2Keys, register_input_files
from flux2_pipeline.paths import is_local, local_path
from flux2_pipeline.resources import InputScan
from flux2_pipeline.settings import Settings, SettingsError

RUN_TAG = "flux2/launched_by"
REMOTE_OUTPUT_HOMES = Path("~/.flux2-pipeline/dagster")
"""Where Dagster instances live when FLUX2_OUTPUT_DIR is an object store (one per URI)."""
PROGRESS_POLL_SECONDS = 0.5
STATUS_COUNTS = ("completed", "failed", "invalid", "cancelled")

Progress = Callable[[str, Mapping[str, Any]], None]
"""Called with a partition key and its latest progress metadata (rows done, failed, cost)."""


@dataclass(frozen=True)
class PartitionSummary:
    """How one partition's run went, from its materialization or failure metadata."""

    partition: str
    succeeded: bool
    seconds: float
    rows: int = 0
    completed: int = 0
    failed: int = 0
    invalid: int = 0
    cancelled: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    results_path: str | None = None
    images: int = 0
    images_failed: int = 0
    interrupted: bool = False


@dataclass(frozen=True)
class DatasetSummary:
    """How the (unpartitioned) training dataset's run went."""

    succeeded: bool
    seconds: float
    rows: int = 0
    shards: int = 0
    path: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class MaterializeReport:
    """Every partition's summary, the training dataset's when it ran, and skipped files."""

    partitions: list[PartitionSummary]
    dataset: DatasetSummary | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        """True when the user stopped the command (the remaining partitions did not start)."""
        return any(s.interrupted for s in self.partitions)

    @property
    def succeeded(self) -> bool:
        """True when every run succeeded and no input file was skipped."""
        runs_ok = all(s.succeeded for s in self.partitions)
        return runs_ok and not self.skipped and (self.dataset is None or self.dataset.succeeded)


def default_dagster_home(settings: Settings) -> Path:
    """The Dagster instance folder used when DAGSTER_HOME is unset.

    `<output>/.dagster` for a local output folder. Run history is local state (SQLite),
    so for an object-store output it is `~/.flux2-pipeline/dagster/<sha256(URI)[:12]>`:
    one instance per output URI on this machine.
    """
    output = settings.storage.output_root()
    if is_local(output):
        return local_path(output) / ".dagster"
    digest = hashlib.sha256(str(output).encode()).hexdigest()[:12]
    return REMOTE_OUTPUT_HOMES.expanduser() / digest


def open_instance(settings: Settings) -> DagsterInstance:
    """DAGSTER_HOME's instance, or a persistent one at `default_dagster_home`.

    Creating an instance's SQLite storages is not safe from two processes at once (both
    run Alembic); a lock file in the folder makes the second wait for the first.
    """
    home = settings.dagster_home or default_dagster_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / ".flux2-setup.lock"):
        config = home / "dagster.yaml"
        if settings.dagster_home is None and not config.exists():
            config.write_text("telemetry:\n  enabled: false\n")
        # Dagster warns on stderr when dagster.yaml is absent; its defaults are what we want.
        dagster_logger = logging.getLogger("dagster")
        level = dagster_logger.level
        dagster_logger.setLevel(logging.ERROR)
        try:
            instance = DagsterInstance.from_config(str(home))
        finally:
            dagster_logger.setLevel(level)
        # Touch every storage while holding the lock, so each is created and stamped once.
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("flux2_setup_probe")
        instance.all_instigator_state()
        return instance


def failed_partitions(instance: DagsterInstance, keys: Sequence[str]) -> list[str]:
    """The partitions whose latest run ended in failure."""
    failed = []
    for key in keys:
        records = instance.get_run_records(RunsFilter(tags={"dagster/partition": key}), limit=1)
        if records and records[0].dagster_run.status == DagsterRunStatus.FAILURE:
            failed.append(key)
    return failed


@dataclass(frozen=True)
class _Selection:
    partitioned: list[AssetKey]
    unpartitioned: list[AssetKey]
    explicit: bool


def _select(defs: Definitions, names: Sequence[str]) -> _Selection:
    graph = defs.resolve_asset_graph()
    materializable = {
        key.to_user_string(): key
        for key in graph.get_all_asset_keys()
        if graph.get(key).is_materializable
    }
    unknown = [name for name in names if name not in materializable]
    if unknown:
        raise SettingsError(
            f"--select: unknown asset {unknown[0]!r} (choose from {', '.join(materializable)})"
        )
    chosen = [materializable[name] for name in (names or materializable)]
    ordered = [key for key in graph.toposorted_asset_keys if key in chosen]
    return _Selection(
        partitioned=[k for k in ordered if graph.get(k).partitions_def is not None],
        unpartitioned=[k for k in ordered if graph.get(k).partitions_def is None],
        explicit=bool(names),
    )


def materialize_partitions(settings: Settings, **options: Any) -> list[PartitionSummary]:
    """`materialize(settings, **options).partitions`."""
    return materialize(settings, **options).partitions


def materialize(
    settings: Settings,
    *,
    partitions: Sequence[str] = (),
    select: Sequence[str] = (),
    retry_failed: bool = False,
    instance: DagsterInstance | None = None,
    log_level: str = "INFO",
    progress: Progress | None = None,
) -> MaterializeReport:
    """Run the selected partitioned assets per partition, then the unpartitioned ones once.

    The training dataset runs when it is selected (the default selects every asset) and
    either it was named in `select` or at least one partition ran. A stop (Ctrl+C) ends
    the current partition cleanly and starts no other; the report says so. Raises
    `SettingsError` for an unknown partition or asset name.

    Example::

        report = materialize(settings, select=["flux2_images"], partitions=["cats"])
    """
    settings.runcomfy.check_token()
    storage = settings.storage
    if not Path(storage.input_dir).is_dir():
        raise SettingsError(
            "FLUX2_INPUT_DIR must be a folder of Parquet files; "
            f"{storage.input_dir} is not a folder"
        )
    defs = settings.definitions()
    selection = _select(defs, select)
    instance = instance or open_instance(settings)
    scan = register_input_files(instance, Flux2Keys(), storage)
    for key in partitions:
        if f"{key}.parquet" in scan.skipped:
            raise SettingsError(
                f"--partition: {key}.parquet cannot be a partition: its name "
                f"{scan.skipped[f'{key}.parquet']}; rename the file"
            )
        if key not in scan.found:
            raise SettingsError(f"--partition: no input file {key}.parquet in {storage.input_dir}")
    chosen = list(partitions) or list(scan.found)
    if retry_failed:
        chosen = failed_partitions(instance, chosen)
    job = defs.resolve_implicit_global_asset_job_def()
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    summaries: list[PartitionSummary] = []
    for key in chosen if selection.partitioned else ():
        summary = run_partition(
            job, instance, key, selection.partitioned, run_config=run_config, progress=progress
        )
        summaries.append(summary)
        if summary.interrupted:
            break
    dataset = None
    wants_dataset = selection.unpartitioned and (selection.explicit or summaries)
    if wants_dataset and not any(s.interrupted for s in summaries):
        dataset = _run_dataset(job, instance, selection.unpartitioned, run_config)
    skipped = {} if partitions else scan.skipped
    return MaterializeReport(summaries, dataset, skipped)


def run_partition(
    job: JobDefinition,
    instance: DagsterInstance,
    key: str,
    assets: Sequence[AssetKey],
    *,
    run_config: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> PartitionSummary:
    """One run of `assets` for partition `key`, summarized; an interrupt is a result too."""
    started = time.monotonic()
    run_id = str(uuid.uuid4())
    watcher = _ProgressWatcher(instance, run_id, key, progress) if progress else None
    try:
        result = job.execute_in_process(
            instance=instance,
            partition_key=key,
            asset_selection=list(assets),
            raise_on_error=False,
            run_config=dict(run_config or {}),
            run_id=run_id,
            tags={RUN_TAG: "flux2-pipeline materialize"},
        )
    except KeyboardInterrupt:
        return PartitionSummary(
            key, False, time.monotonic() - started, error="stopped", interrupted=True
        )
    finally:
        if watcher is not None:
            watcher.stop()
    summary = _summarize(key, result, time.monotonic() - started)
    if progress is not None and summary.rows:
        progress(
            key,
            {
                "flux2/rows_total": summary.rows,
                "flux2/rows_done": summary.rows,
                "flux2/rows_failed": summary.failed + summary.cancelled,
                "flux2/cost_usd": summary.cost_usd,
                "flux2/seconds": summary.seconds,
            },
        )
    return summary


class _ProgressWatcher:
    """Follows a run's progress observations from the event log, on a thread of its own."""

    def __init__(
        self, instance: DagsterInstance, run_id: str, partition: str, progress: Progress
    ) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._follow, args=(instance, run_id, partition, progress), daemon=True
        )
        self._thread.start()

    def _follow(
        self, instance: DagsterInstance, run_id: str, partition: str, progress: Progress
    ) -> None:
        cursor = None
        while not self._stop.wait(PROGRESS_POLL_SECONDS):
            try:
                page = instance.get_records_for_run(
                    run_id, cursor=cursor, of_type=DagsterEventType.ASSET_OBSERVATION
                )
            except Exception:  # the run may not exist yet; progress is best effort
                continue
            cursor = page.cursor
            for record in page.records:
                event = record.event_log_entry.dagster_event
                if event is not None and event.asset_observation_data is not None:
                    metadata = event.asset_observation_data.asset_observation.metadata
                    progress(partition, {k: v.value for k, v in metadata.items()})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _run_dataset(
    job: JobDefinition,
    instance: DagsterInstance,
    assets: Sequence[AssetKey],
    run_config: Mapping[str, Any],
) -> DatasetSummary:
    started = time.monotonic()
    try:
        result = job.execute_in_process(
            instance=instance,
            asset_selection=list(assets),
            raise_on_error=False,
            run_config=dict(run_config),
            tags={RUN_TAG: "flux2-pipeline materialize"},
        )
    except KeyboardInterrupt:
        return DatasetSummary(False, time.monotonic() - started, error="stopped")
    seconds = time.monotonic() - started
    if not result.success:
        return DatasetSummary(False, seconds, error=_error(result))
    metadata = _metadata(result)
    return DatasetSummary(
        True,
        seconds,
        rows=int(metadata.get("dagster/row_count", 0)),
        shards=int(metadata.get("flux2/shards", 0)),
        path=str(metadata.get("flux2/path", "")) or None,
    )


def _metadata(result: ExecuteInProcessResult) -> dict[str, Any]:
    """Every materialization's and failure's metadata of the run, as plain values."""
    merged: dict[str, Any] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization is not None:
            merged.update({k: v.value for k, v in materialization.metadata.items()})
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data is not None and data.user_failure_data is not None:
            merged.update({k: v.value for k, v in data.user_failure_data.metadata.items()})
    return merged


def _summarize(key: str, result: ExecuteInProcessResult, seconds: float) -> PartitionSummary:
    metadata = _metadata(result)

    def count(name: str) -> int:
        value = metadata.get(name, 0)
        return int(value) if isinstance(value, int | float) else 0

    return PartitionSummary(
        key,
        result.success,
        seconds,
        rows=sum(count(f"flux2/{status}") for status in STATUS_COUNTS),
        completed=count("flux2/completed"),
        failed=count("flux2/failed"),
        invalid=count("flux2/invalid"),
        cancelled=count("flux2/cancelled"),
        cost_usd=float(metadata.get("flux2/cost_usd", 0.0) or 0.0),
        error=_error(result),
        results_path=str(metadata["flux2/results_path"])
        if "flux2/results_path" in metadata
        else None,
        images=count("flux2/images_stored"),
        images_failed=count("flux2/images_failed"),
        interrupted=bool(metadata.get(INTERRUPTED, False)),
    )


def _error(result: ExecuteInProcessResult) -> str | None:
    """The first failure in one line: a Failure's description, else the innermost cause."""
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data is None:
            continue
        if data.user_failure_data is not None and data.user_failure_data.description:
            return str(data.user_failure_data.description)
        if data.error is not None:
            return innermost_error(data.error)
    # A failure outside a step (a resource that could not start): the event carrying the error.
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if isinstance(error, SerializableErrorInfo):
            return innermost_error(error)
    for event in result.all_events:
        if event.event_type == DagsterEventType.RUN_FAILURE:
            return event.message or "the run failed"
    return None


def innermost_error(error: SerializableErrorInfo) -> str:
    """`ClassName: message` of the deepest cause of `error`, on one line.

    Dagster wraps a step's exception ("Error occurred while executing op ..."); the
    person at the terminal needs what went wrong underneath.
    """
    while True:
        deeper = error.cause or error.context
        if deeper is None:
            break
        error = deeper
    lines = [line.strip() for line in (error.message or "").splitlines() if line.strip()]
    text = lines[0] if lines else error.cls_name or "unknown error"
    name = (error.cls_name or "").rsplit(".", 1)[-1]
    return text if not name or text.split(":", 1)[0].endswith(name) else f"{name}: {text}"


def format_summary(summaries: Sequence[PartitionSummary]) -> str:
    """A plain-text table of the partition summaries."""
    header = (
        "partition",
        "rows",
        "completed",
        "failed",
        "invalid",
        "cancelled",
        "images",
        "cost_usd",
        "seconds",
        "result",
    )
    rows = [header]
    for s in summaries:
        rows.append(
            (
                s.partition,
                str(s.rows),
                str(s.completed),
                str(s.failed),
                str(s.invalid),
                str(s.cancelled),
                str(s.images) + (f" ({s.images_failed} failed)" if s.images_failed else ""),
                f"{s.cost_usd:.2f}",
                f"{s.seconds:.1f}",
                "ok" if s.succeeded else ("STOPPED" if s.interrupted else "FAILED"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    for s in summaries:
        if not s.succeeded and s.error:
            lines.append(f"{s.partition}: {s.error}")
    return "\n".join(lines)


def format_report(report: MaterializeReport) -> str:
    """`format_summary` of the partitions, the skipped files and the training dataset."""
    lines = [format_summary(report.partitions)] if report.partitions else []
    lines.extend(InputScan(skipped=report.skipped).skipped_lines())
    if report.interrupted:
        lines.append("stopped: the remaining partitions were not started")
    dataset = report.dataset
    if dataset is not None:
        if dataset.succeeded:
            lines.append(
                f"training dataset: {dataset.rows} rows in {dataset.shards} shards "
                f"({dataset.seconds:.1f} s) at {dataset.path}"
            )
        else:
            lines.append(f"training dataset: FAILED: {dataset.error}")
    return "\n".join(lines)
