"""Steps that run several partitions at once: one outcome, one materialization each.

A backfill's runs cover ranges of partitions (`BackfillPolicy.multi_run`), so Dagster's
fixed cost per run is paid once per range. What users see stays per partition:

- every partition that succeeded gets its own materialization, with its own metadata;
- a partition that failed gets none, so Dagster shows it failed while its neighbours
  show materialized, and the step's `Failure` names each failed partition
  (`StepFailureMetadata.partition_failures` holds their figures);
- each check reports one evaluation per partition (`check_each_partition`).

A run of one partition behaves exactly as before ranges existed.

Example::

    outcomes = [PartitionOutcome("cats", {**EditsMetadata(completed=3)})]
    yield from materialize_outcomes(context, keys.edits, outcomes)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
)

from flux2_pipeline.assets.metadata import StepFailureMetadata
from flux2_pipeline.run_limits import DEFAULT_PARTITIONS_PER_RUN as DEFAULT_PARTITIONS_PER_RUN

PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
"""The run tags of a run of one partition or over a range of partitions: Dagster's own
names, spelled here so that nothing imports them from Dagster's private modules."""
FAILURES_NAMED = 5
SUMMARY_FIELDS = (
    "flux2/completed",
    "flux2/failed",
    "flux2/invalid",
    "flux2/cancelled",
    "flux2/cost_usd",
    "flux2/results_path",
    "flux2/images_stored",
    "flux2/images_failed",
    "flux2/interrupted",
)
"""The figures of a failed partition kept in its step's `StepFailureMetadata`
(`partition_failures`, plain JSON values): keys of `EditsMetadata`, `ImagesMetadata` and
`StepFailureMetadata`."""


def ranged_backfills(
    partitions_per_run: int = DEFAULT_PARTITIONS_PER_RUN, *, single_run: bool = False
) -> BackfillPolicy:
    """The backfill policy of the partitioned assets: runs of up to `partitions_per_run`,
    or (`single_run`) one run over the whole range, which `dg launch --partition-range`
    requires.

    >>> ranged_backfills(10).max_partitions_per_run
    10
    >>> ranged_backfills(10, single_run=True).max_partitions_per_run is None
    True
    """
    if single_run:
        return BackfillPolicy.single_run()
    return BackfillPolicy.multi_run(max_partitions_per_run=partitions_per_run)


@dataclass(frozen=True)
class PartitionOutcome:
    """How one partition of a step went: its metadata, and its failure if it failed."""

    key: str
    metadata: Mapping[str, Any]
    failure: Failure | None = None


def plan_runs(keys: Sequence[str], order: Sequence[str], per_run: int) -> list[list[str]]:
    """Group partitions into runs: contiguous in the partitions' order, at most `per_run`.

    A run covers a range of the partitions definition, so partitions not chosen split
    the ranges. Runs of a range are made about equal in size.

    >>> plan_runs(["a", "b", "c", "e"], ["a", "b", "c", "d", "e"], 2)
    [['a', 'b'], ['c'], ['e']]
    >>> plan_runs(list("abcde"), list("abcde"), 3)
    [['a', 'b', 'c'], ['d', 'e']]
    """
    chosen = set(keys)
    ranges: list[list[str]] = [[]]
    for key in order:
        if key in chosen:
            ranges[-1].append(key)
        elif ranges[-1]:
            ranges.append([])
    runs = []
    for block in ranges:
        if not block:
            continue
        count = -(-len(block) // per_run)
        size, extra = divmod(len(block), count)
        start = 0
        for index in range(count):
            end = start + size + (1 if index < extra else 0)
            runs.append(block[start:end])
            start = end
    return runs


def materialize_outcomes(
    context: AssetExecutionContext,
    asset_key: AssetKey,
    outcomes: Sequence[PartitionOutcome],
    *,
    stopped: bool = False,
    check_results: Sequence[AssetCheckResult] = (),
    metadata_added: Collection[str] = (),
) -> Iterator[AssetMaterialization | MaterializeResult[None] | AssetCheckResult]:
    """The step's events for its partitions' outcomes; raises when any partition failed.

    One partition: its `MaterializeResult`, or its own `Failure`. Several, all succeeded:
    one `MaterializeResult` whose materializations carry each partition's metadata.
    Several, some failed: a materialization for each one that succeeded, then a `Failure`
    naming the others (retried by the step's policy only if one of theirs allows it).
    `stopped`: the run was stopped after every partition had finished; each is
    materialized, and the step still fails as stopped, so nothing runs after it.
    `check_results` (the step's own checks) come after the materializations and before
    any failure, so a failed partition's checks are recorded too. `metadata_added`: the
    partitions whose metadata the step already gave `context.add_asset_metadata`.
    """
    if len(outcomes) == 1:
        [only] = outcomes
        if only.failure is not None:
            yield from check_results
            raise only.failure
        yield MaterializeResult(metadata=dict(only.metadata), check_results=list(check_results))
        return
    failed = [outcome for outcome in outcomes if outcome.failure is not None]
    if stopped and not failed:
        for outcome in outcomes:
            yield AssetMaterialization(
                asset_key=asset_key, partition=outcome.key, metadata=dict(outcome.metadata)
            )
        yield from check_results
        raise Failure(
            description="the run was stopped after every partition had finished",
            metadata={
                **StepFailureMetadata(partition_failures=MetadataValue.json({}), interrupted=True)
            },
            allow_retries=False,
        )
    if not failed:
        for outcome in outcomes:
            if outcome.key not in metadata_added:
                context.add_asset_metadata(dict(outcome.metadata), partition_key=outcome.key)
        yield MaterializeResult(check_results=list(check_results))
        return
    for outcome in outcomes:
        if outcome.failure is None:
            yield AssetMaterialization(
                asset_key=asset_key, partition=outcome.key, metadata=dict(outcome.metadata)
            )
    yield from check_results
    raise ranged_failure(failed, len(outcomes))


def ranged_failure(failed: Sequence[PartitionOutcome], total: int) -> Failure:
    """One `Failure` for the failed partitions of a ranged step.

    >>> outcome = PartitionOutcome("b", {}, Failure(description="partition b: 2 rows failed"))
    >>> ranged_failure([outcome], 3).description
    '1 of 3 partitions failed: partition b: 2 rows failed'
    """
    details: dict[str, Any] = {}
    interrupted = False
    for outcome in failed:
        assert outcome.failure is not None
        figures = {**outcome.metadata, **_plain(outcome.failure.metadata)}
        interrupted = interrupted or bool(StepFailureMetadata.extract(figures).interrupted)
        details[outcome.key] = {
            "error": outcome.failure.description,
            **{name: _plain_value(figures[name]) for name in SUMMARY_FIELDS if name in figures},
        }
    named = " | ".join(
        str(outcome.failure.description) for outcome in failed[:FAILURES_NAMED] if outcome.failure
    )
    more = f" (and {len(failed) - FAILURES_NAMED} more)" if len(failed) > FAILURES_NAMED else ""
    metadata = StepFailureMetadata(
        partition_failures=MetadataValue.json(details), interrupted=interrupted or None
    )
    return Failure(
        description=f"{len(failed)} of {total} partitions failed: {named}{more}",
        metadata=dict(metadata),
        allow_retries=any(outcome.failure.allow_retries for outcome in failed if outcome.failure),
    )


def _plain(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _plain_value(value) for name, value in metadata.items()}


def _plain_value(value: Any) -> Any:
    inner = getattr(value, "value", value)
    return inner if isinstance(inner, str | int | float | bool) or inner is None else str(inner)


def partition_check_evaluation(
    result: AssetCheckResult, asset_key: AssetKey, check_name: str, partition: str
) -> AssetCheckEvaluation:
    """One partition's evaluation of a check in a ranged step, as the UI shows it per partition.

    `result` is what the check found on that partition alone.
    """
    return AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=check_name,
        passed=result.passed,
        metadata=result.metadata,
        severity=result.severity,
        description=result.description,
        partition=partition,
        target_materialization_data=None,
    )


def ranged_check_summary(
    results: Mapping[str, AssetCheckResult],
    *,
    asset_key: AssetKey | None = None,
    check_name: str | None = None,
) -> AssetCheckResult:
    """The step's own result of a check over its partitions' results: it passes only if
    every partition passed, and names the first that did not.

    >>> found = {"a": AssetCheckResult(passed=True), "b": AssetCheckResult(passed=False)}
    >>> ranged_check_summary(found).metadata["examples"].value
    'b'
    """
    failed = [key for key, result in results.items() if not result.passed]
    severities = [result.severity for result in results.values()]
    return AssetCheckResult(
        passed=not failed,
        asset_key=asset_key,
        check_name=check_name,
        severity=severities[-1] if severities else AssetCheckSeverity.ERROR,
        metadata={
            "partitions_checked": len(results),
            "partitions_failed": len(failed),
            "examples": ", ".join(failed[:FAILURES_NAMED]),
        },
    )


class PartitionChecks:
    """A step's check results, partition by partition, as the UI shows them.

    In a ranged step, each partition's result is logged as its own evaluation when it is
    added, and the step's own result of each check passes only if every partition passed
    (`ranged_check_summary`). In a one-partition step, the step's result is the partition's.

    Example::

        found = PartitionChecks(keys.edits, ranged=True, log_event=context.log_event)
        found.add("cats", "no_invalid_rows", AssetCheckResult(passed=True))
        yield from found.step_results()
    """

    def __init__(
        self,
        asset_key: AssetKey,
        *,
        ranged: bool,
        log_event: Callable[[AssetCheckEvaluation], object],
    ) -> None:
        self.asset_key = asset_key
        self.ranged = ranged
        self._log_event = log_event
        self._by_check: dict[str, dict[str, AssetCheckResult]] = {}

    def add(self, partition: str, check_name: str, result: AssetCheckResult) -> None:
        """Record `result`, what check `check_name` found on `partition` alone."""
        self._by_check.setdefault(check_name, {})[partition] = result
        if self.ranged:
            self._log_event(
                partition_check_evaluation(result, self.asset_key, check_name, partition)
            )

    def step_results(self) -> list[AssetCheckResult]:
        """The step's own result of each check added, in the order they were first added."""
        if not self.ranged:
            return [result for found in self._by_check.values() for result in found.values()]
        return [
            ranged_check_summary(found, asset_key=self.asset_key, check_name=name)
            for name, found in self._by_check.items()
        ]


def check_each_partition(
    context: AssetCheckExecutionContext, evaluate: Callable[[str], AssetCheckResult]
) -> AssetCheckResult:
    """Evaluate a check on every partition of the step; one evaluation per partition.

    One partition: `evaluate(key)` as is. Several: each partition's evaluation is logged
    with its partition key (what the UI shows per partition), and the step's result
    passes only if every partition passed, naming the first that did not.
    """
    keys = context.op_execution_context.partition_keys
    [spec] = context.check_specs
    found = PartitionChecks(
        spec.asset_key,
        ranged=len(keys) > 1,
        # `log_event` records an AssetCheckEvaluation (Dagster's op context handles that
        # type explicitly) although its annotation leaves it out.
        log_event=context.op_execution_context.log_event,  # type: ignore[arg-type]
    )
    for key in keys:
        found.add(key, spec.name, evaluate(key))
    [result] = found.step_results()
    return result
