"""What a backfill did, per partition and for the training dataset, read from the runs'
materializations and step failures (`StepFailureMetadata.partition_failures` names each
failed partition of a range), and its text.

Example::

    summaries = summarize(["cats", "dogs"], [Flux2Keys().edits], result, seconds=4.2)
    print(format_report(BackfillReport(summaries)))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dagster import AssetKey, AssetMaterialization, DagsterEventType, ExecuteInProcessResult
from dagster_shared.error import SerializableErrorInfo

from flux2_pipeline.assets.metadata import EditsMetadata, ImagesMetadata, StepFailureMetadata
from flux2_pipeline.resources import InputScan


@dataclass(frozen=True)
class PartitionSummary:
    """How one partition's run went, from its materialization or failure metadata.

    Example::

        PartitionSummary("cats", succeeded=False, seconds=0.0, error="stopped")
    """

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
    blocked: bool = False
    """Its own steps succeeded, but another partition's failure skipped the steps after them
    (checks, later assets) for its whole run; `run_backfill` runs those again for it."""
    skipped_assets: tuple[str, ...] = ()
    """The selected assets the blocked partition was not materialized for."""

    @classmethod
    def from_metadata(
        cls,
        key: str,
        metadata: Mapping[str, Any],
        succeeded: bool,
        error: str | None,
        seconds: float,
    ) -> PartitionSummary:
        """The summary of partition `key` from its materialization and failure metadata.

        >>> PartitionSummary.from_metadata("cats", {"flux2/completed": 2}, True, None, 1.0).rows
        2
        """
        edits, images = EditsMetadata.extract(metadata), ImagesMetadata.extract(metadata)
        completed, failed = edits.completed or 0, edits.failed or 0
        invalid, cancelled = edits.invalid or 0, edits.cancelled or 0
        return cls(
            key,
            succeeded,
            edits.seconds or seconds,
            rows=completed + failed + invalid + cancelled,
            completed=completed,
            failed=failed,
            invalid=invalid,
            cancelled=cancelled,
            cost_usd=edits.cost_usd or 0.0,
            error=None if succeeded else error,
            results_path=edits.results_path.path if edits.results_path else None,
            images=images.images_stored or 0,
            images_failed=images.images_failed or 0,
            interrupted=bool(StepFailureMetadata.extract(metadata).interrupted),
        )


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
class BackfillReport:
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


def run_metadata(result: ExecuteInProcessResult) -> dict[str, Any]:
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


@dataclass
class _RunFigures:
    """A run's events sorted by partition."""

    figures: dict[str, dict[str, Any]]
    """Each partition's materialization and failure metadata."""
    materialized: dict[str, set[AssetKey]]
    """The assets each partition was materialized for."""
    errors: dict[str, str]
    """The failure of each partition that failed on its own."""
    unattributed: bool = False
    """A step failed without naming its partitions (an exception in a check, a crash)."""
    stopped: bool = False
    """The run was stopped (its partitions that had finished are materialized)."""


def materialized_figures(
    keys: Sequence[str], materializations: Iterable[AssetMaterialization | None]
) -> tuple[dict[str, dict[str, Any]], dict[str, set[AssetKey]]]:
    """Each partition's materialization metadata, and the assets it was materialized for."""
    figures: dict[str, dict[str, Any]] = {key: {} for key in keys}
    materialized: dict[str, set[AssetKey]] = {key: set() for key in keys}
    only = keys[0] if len(keys) == 1 else None
    for materialization in materializations:
        key = (materialization.partition if materialization else None) or only
        if materialization is not None and key in figures:
            figures[key].update({k: v.value for k, v in materialization.metadata.items()})
            materialized[key].add(materialization.asset_key)
    return figures, materialized


def _by_partition(keys: Sequence[str], result: ExecuteInProcessResult) -> _RunFigures:
    """Each partition's metadata, how many materializations it got, and its own error."""
    events = result.get_asset_materialization_events()
    figures, materialized = materialized_figures(
        keys, (event.step_materialization_data.materialization for event in events)
    )
    errors: dict[str, str] = {}
    unattributed = stopped = False
    only = keys[0] if len(keys) == 1 else None
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data is None or data.user_failure_data is None:
            unattributed = True
            continue
        stored = data.user_failure_data.metadata
        metadata = {k: v.value for k, v in stored.items()}
        step = StepFailureMetadata.extract(stored)
        failures = step.partition_failures.data if step.partition_failures else None
        stopped = stopped or bool(step.interrupted)
        if isinstance(failures, dict):
            for key, details in failures.items():
                if key in figures and isinstance(details, dict):
                    figures[key].update(details)
                    errors.setdefault(key, str(details.get("error") or "failed"))
        elif only is not None:
            figures[only].update(metadata)
            if data.user_failure_data.description:
                errors.setdefault(only, str(data.user_failure_data.description))
        else:
            unattributed = True
    if not result.success and not result.get_step_failure_events():
        unattributed = True  # the run failed outside its steps (a resource, the executor)
    return _RunFigures(figures, materialized, errors, unattributed, stopped)


def summarize(
    keys: Sequence[str],
    assets: Sequence[AssetKey],
    result: ExecuteInProcessResult,
    seconds: float,
) -> list[PartitionSummary]:
    """One summary per partition of the run's `keys`, in their order."""
    run = _by_partition(keys, result)
    run_error = None if result.success else (first_error(result) or "the run failed")
    summaries = []
    for key in keys:
        error = run.errors.get(key)
        missing = [asset for asset in assets if asset not in run.materialized[key]]
        blocked = not result.success and error is None and bool(run.errors)
        blocked = blocked and not run.unattributed and not run.stopped
        if result.success:
            done = True
        elif blocked:
            failed = next(iter(run.errors))
            done, error = (
                False,
                f"later steps did not run: partition {failed} failed in the same run",
            )
        else:
            done = error is None and not run.unattributed and not missing
            error = error if done or error is not None else run_error
        summary = PartitionSummary.from_metadata(key, run.figures[key], done, error, seconds)
        summaries.append(
            replace(
                summary,
                blocked=blocked,
                skipped_assets=tuple(asset.to_user_string() for asset in missing),
                interrupted=summary.interrupted or run.stopped,
            )
        )
    return summaries


def first_error(result: ExecuteInProcessResult) -> str | None:
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
    while (deeper := error.cause or error.context) is not None:
        error = deeper
    return one_line(error.cls_name, error.message)


def one_line(class_name: str | None, message: str | None) -> str:
    """`ClassName: first line of the message`, without naming the class twice.

    >>> one_line("ValueError", "bad\\nvalue")
    'ValueError: bad'
    >>> one_line("psycopg.OperationalError", "OperationalError: no route\\n")
    'OperationalError: no route'
    """
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    text = lines[0] if lines else class_name or "unknown error"
    name = (class_name or "").rsplit(".", 1)[-1]
    return text if not name or text.split(":", 1)[0].endswith(name) else f"{name}: {text}"


def format_summary(summaries: Sequence[PartitionSummary]) -> str:
    """A plain-text table of the partition summaries, then each failure's error."""
    header = "partition rows completed failed invalid cancelled images cost_usd seconds result"
    rows = [tuple(header.split())]
    for s in summaries:
        images = str(s.images) + (f" ({s.images_failed} failed)" if s.images_failed else "")
        result = "ok" if s.succeeded else ("STOPPED" if s.interrupted else "FAILED")
        counts = (s.rows, s.completed, s.failed, s.invalid, s.cancelled)
        figures = (images, f"{s.cost_usd:.2f}", f"{s.seconds:.1f}", result)
        rows.append((s.partition, *map(str, counts), *figures))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.extend(f"{s.partition}: {s.error}" for s in summaries if not s.succeeded and s.error)
    return "\n".join(lines)


def format_report(report: BackfillReport) -> str:
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
