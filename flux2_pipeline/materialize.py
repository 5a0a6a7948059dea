"""Materialize partitions through the project's `Definitions`, one run per partition.

This is what `flux2-pipeline materialize` and the demo call. Every input file is
registered as a partition first; the selected partitions then run in turn on the
Dagster instance (DAGSTER_HOME, or one kept under a local output directory, or under
`~/.flux2-pipeline/dagster/<digest of the URI>` when the output is an object store), each run
materializing the selected partitioned assets (flux2_edits, then flux2_images). When
flux2_training_dataset is selected it runs once at the end, unpartitioned.

Example::

    report = materialize(Settings.from_env(), partitions=["cats"])
    print(format_report(report))
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRunStatus,
    ExecuteInProcessResult,
    RunsFilter,
)
from upath import UPath

from flux2_pipeline.assets import PARTITIONS_NAME
from flux2_pipeline.definitions import build_definitions
from flux2_pipeline.paths import file_size, is_local, local_path, read_parquet
from flux2_pipeline.resources import STOP_REQUESTED, Flux2Storage
from flux2_pipeline.settings import Settings, SettingsError

ASSET_NAMES = ("flux2_edits", "flux2_images", "flux2_training_dataset")
PARTITIONED_ASSETS = ("flux2_edits", "flux2_images")
DATASET_ASSET = "flux2_training_dataset"
RUN_TAG = "flux2/launched_by"
REMOTE_OUTPUT_HOMES = Path("~/.flux2-pipeline/dagster")
"""Where Dagster instances live when FLUX2_OUTPUT_DIR is an object store (one per URI)."""


@dataclass(frozen=True)
class PartitionSummary:
    """How one partition's run went."""

    partition: str
    succeeded: bool
    seconds: float
    rows: int = 0
    completed: int = 0
    failed: int = 0
    invalid: int = 0
    cancelled: int = 0
    error: str | None = None
    results_path: UPath | None = None
    images: int = 0
    images_failed: int = 0


@dataclass(frozen=True)
class DatasetSummary:
    """How the (unpartitioned) training dataset's run went."""

    succeeded: bool
    seconds: float
    rows: int = 0
    shards: int = 0
    path: UPath | None = None
    error: str | None = None


@dataclass(frozen=True)
class MaterializeReport:
    """Every partition's summary, and the training dataset's when it ran."""

    partitions: list[PartitionSummary]
    dataset: DatasetSummary | None = None

    @property
    def succeeded(self) -> bool:
        """True when every run succeeded."""
        runs_ok = all(s.succeeded for s in self.partitions)
        return runs_ok and (self.dataset is None or self.dataset.succeeded)


def default_dagster_home(settings: Settings) -> Path:
    """The Dagster instance folder used when DAGSTER_HOME is unset.

    `<output>/.dagster` for a local output folder. Run history is local state (SQLite),
    so for an object-store output it is `~/.flux2-pipeline/dagster/<sha256(URI)[:12]>`:
    one instance per output URI on this machine.
    """
    if is_local(settings.output_dir):
        return local_path(settings.output_dir) / ".dagster"
    digest = hashlib.sha256(str(settings.output_dir).encode()).hexdigest()[:12]
    return REMOTE_OUTPUT_HOMES.expanduser() / digest


def open_instance(settings: Settings) -> DagsterInstance:
    """DAGSTER_HOME's instance, or a persistent one at `default_dagster_home`."""
    configured = os.environ.get("DAGSTER_HOME", "").strip()
    if configured:
        home = Path(configured)
        if not home.is_absolute() or not home.is_dir():
            raise SettingsError(
                "DAGSTER_HOME must be an absolute path to an existing directory, "
                f"got {configured!r}"
            )
    else:
        home = default_dagster_home(settings)
        home.mkdir(parents=True, exist_ok=True)
        config = home / "dagster.yaml"
        if not config.exists():
            config.write_text("telemetry:\n  enabled: false\n")
    # Dagster warns on stderr when dagster.yaml is absent; its defaults are what we want.
    dagster_logger = logging.getLogger("dagster")
    level = dagster_logger.level
    dagster_logger.setLevel(logging.ERROR)
    try:
        return DagsterInstance.from_config(str(home))
    finally:
        dagster_logger.setLevel(level)


def register_partitions(
    instance: DagsterInstance, storage: Flux2Storage
) -> tuple[list[str], dict[str, str]]:
    """Add a partition for every input file; return all keys and the rejected file names."""
    found, rejected = storage.scan_inputs()
    known = set(instance.get_dynamic_partitions(PARTITIONS_NAME))
    new = [key for key in found if key not in known]
    if new:
        instance.add_dynamic_partitions(PARTITIONS_NAME, new)
    return list(found), rejected


def failed_partitions(instance: DagsterInstance, keys: Sequence[str]) -> list[str]:
    """The partitions whose latest run of flux2_edits ended in failure."""
    failed = []
    for key in keys:
        records = instance.get_run_records(RunsFilter(tags={"dagster/partition": key}), limit=1)
        if records and records[0].dagster_run.status == DagsterRunStatus.FAILURE:
            failed.append(key)
    return failed


def materialize_partitions(
    settings: Settings,
    *,
    partitions: Sequence[str] = (),
    select: Sequence[str] = (),
    retry_failed: bool = False,
    instance: DagsterInstance | None = None,
    log_level: str = "INFO",
) -> list[PartitionSummary]:
    """Run the selected assets for the selected partitions; one summary per partition.

    Same runs as `materialize` (the training dataset included when selected); this form
    returns only the partitions' summaries. Raises `SettingsError` for an unknown partition
    or asset name.
    """
    return materialize(
        settings,
        partitions=partitions,
        select=select,
        retry_failed=retry_failed,
        instance=instance,
        log_level=log_level,
    ).partitions


def materialize(
    settings: Settings,
    *,
    partitions: Sequence[str] = (),
    select: Sequence[str] = (),
    retry_failed: bool = False,
    instance: DagsterInstance | None = None,
    log_level: str = "INFO",
) -> MaterializeReport:
    """Run the selected partitioned assets per partition, then the training dataset once.

    The dataset runs when it is selected (the default selects every asset) and either it
    was named in `select` or at least one partition ran. Raises `SettingsError` for an
    unknown partition or asset name.

    Example::

        report = materialize(settings, select=["flux2_images"], partitions=["cats"])
    """
    settings.require_token()
    if not settings.input_dir.is_dir():
        raise SettingsError(
            "FLUX2_INPUT_DIR must be a folder of Parquet files; "
            f"{settings.input_dir} is not a folder"
        )
    defs = build_definitions(settings)
    storage = Flux2Storage(input_dir=str(settings.input_dir), output_dir=str(settings.output_dir))
    unknown_assets = [name for name in select if name not in ASSET_NAMES]
    if unknown_assets:
        raise SettingsError(
            f"--select: unknown asset {unknown_assets[0]!r} (choose from {', '.join(ASSET_NAMES)})"
        )
    instance = instance or open_instance(settings)
    keys, _ = register_partitions(instance, storage)
    missing = [key for key in partitions if key not in keys]
    if missing:
        raise SettingsError(
            f"--partition: no input file {missing[0]}.parquet in {settings.input_dir}"
        )
    chosen = list(partitions) or keys
    if retry_failed:
        chosen = failed_partitions(instance, chosen)
    job = defs.resolve_implicit_global_asset_job_def()
    selected = [name for name in ASSET_NAMES if name in (select or ASSET_NAMES)]
    asset_selection = [AssetKey(name) for name in selected if name in PARTITIONED_ASSETS]
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    summaries = []
    for key in chosen if asset_selection else ():
        started = time.monotonic()
        result = job.execute_in_process(
            instance=instance,
            partition_key=key,
            asset_selection=asset_selection,
            raise_on_error=False,
            run_config=run_config,
            tags={RUN_TAG: "flux2-pipeline materialize"},
        )
        summaries.append(
            _summarize(key, result.success, time.monotonic() - started, storage, _error(result))
        )
        if STOP_REQUESTED.is_set():
            break  # the user stopped us: don't start the next partition
    dataset = None
    wants_dataset = DATASET_ASSET in selected and (DATASET_ASSET in select or summaries)
    if wants_dataset and not STOP_REQUESTED.is_set():
        started = time.monotonic()
        result = job.execute_in_process(
            instance=instance,
            asset_selection=[AssetKey(DATASET_ASSET)],
            raise_on_error=False,
            run_config=run_config,
            tags={RUN_TAG: "flux2-pipeline materialize"},
        )
        dataset = _dataset_summary(result, time.monotonic() - started, storage)
    return MaterializeReport(summaries, dataset)


def _dataset_summary(
    result: ExecuteInProcessResult, seconds: float, storage: Flux2Storage
) -> DatasetSummary:
    path = storage.training_dataset_dir()
    if not result.success:
        return DatasetSummary(False, seconds, error=_error(result))
    metadata = result.asset_materializations_for_node(DATASET_ASSET)[0].metadata
    rows, shards = metadata["dagster/row_count"].value, metadata["flux2/shards"].value
    return DatasetSummary(
        True,
        seconds,
        rows=rows if isinstance(rows, int) else 0,
        shards=shards if isinstance(shards, int) else 0,
        path=path,
    )


def _error(result: ExecuteInProcessResult) -> str | None:
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data is None:
            continue
        if data.user_failure_data is not None and data.user_failure_data.description:
            return str(data.user_failure_data.description)
        if data.error is not None:
            return str(data.error.message).strip().splitlines()[0]
    return None


def _summarize(
    key: str, succeeded: bool, seconds: float, storage: Flux2Storage, error: str | None
) -> PartitionSummary:
    path = storage.results_path(key)
    if file_size(path) is None:
        return PartitionSummary(key, succeeded, seconds, error=error)
    status = read_parquet(path, columns=["status"])["status"]
    counts = {row["values"]: row["counts"] for row in pc.value_counts(status).to_pylist()}
    images = images_failed = 0
    manifest = storage.image_manifest_path(key)
    if file_size(manifest) is not None:
        image_status = read_parquet(manifest, columns=["status"])["status"]
        images = int(pc.sum(pc.equal(image_status, "ok")).as_py() or 0)
        images_failed = len(image_status) - images
    return PartitionSummary(
        key,
        succeeded,
        seconds,
        rows=len(status),
        completed=counts.get("completed", 0),
        failed=counts.get("failed", 0),
        invalid=counts.get("invalid", 0),
        cancelled=counts.get("cancelled", 0),
        error=error,
        results_path=path,
        images=images,
        images_failed=images_failed,
    )


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
                f"{s.seconds:.1f}",
                "ok" if s.succeeded else "FAILED",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    for s in summaries:
        if not s.succeeded and s.error:
            lines.append(f"{s.partition}: {s.error}")
    return "\n".join(lines)


def format_report(report: MaterializeReport) -> str:
    """`format_summary` of the partitions, plus a line for the training dataset."""
    lines = [format_summary(report.partitions)] if report.partitions else []
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
