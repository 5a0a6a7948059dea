"""`flux2_edits`: one partition's prompt table in, its results dataset out.

The step streams the input file, runs every valid row through the API with the
ledger in the loop (see `flux2_pipeline.batch.runner`), writes
`$FLUX2_OUTPUT_DIR/flux2_edits/<key>.parquet` atomically, and then fails if any
valid row did not complete, naming the counts and the first rows. Its
`RetryPolicy` runs it again; the ledger makes sure only failed rows are paid again.

A backfill's run covers up to `partitions_per_run` partitions (see
`flux2_pipeline.assets.ranges`): their rows share one in-flight limit, the next
partition starting as soon as the one before has read its last row, and each partition
still gets its own results file, materialization or failure.
"""

import asyncio
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetMaterialization,
    AssetObservation,
    AssetsDefinition,
    AssetSpec,
    Backoff,
    DynamicPartitionsDefinition,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    TableColumn,
    TableColumnDep,
    TableColumnLineage,
    TableSchema,
    multi_asset,
)
from upath import UPath

from flux2_pipeline.assets.checks import EDITS_CHECKS, edits_check_specs, evaluate_edits_checks
from flux2_pipeline.assets.hooks import ExecuteHook, with_execute
from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.assets.metadata import (
    EditsMetadata,
    EditsProgress,
    EstimateMetadata,
    InputMetadata,
    StepFailureMetadata,
)
from flux2_pipeline.assets.ranges import (
    DEFAULT_PARTITIONS_PER_RUN,
    PartitionChecks,
    PartitionOutcome,
    materialize_outcomes,
    ranged_backfills,
)
from flux2_pipeline.assets.uri import URI, storage_uri
from flux2_pipeline.batch import (
    LARGE_ROW_GROUP_ROWS,
    RESULT_COLUMN_DESCRIPTIONS,
    RESULTS_SCHEMA,
    AccountStop,
    EditRunner,
    InputTableError,
    ReferenceCheck,
    ResultsWriter,
    RowOutcome,
    file_sha256,
    input_shape,
    read_input_rows,
)
from flux2_pipeline.batch.estimate import (
    RunEstimate,
    estimate_run,
    quote_price,
    rows_while_readable,
    unpaid_work,
)
from flux2_pipeline.batch.freshness import InputChanged, InputRead, commit_for_input, superseded
from flux2_pipeline.batch.latency import LatencySketch
from flux2_pipeline.batch.wakeup import SlotWakeup
from flux2_pipeline.net import AddressPolicy, GuardedFetcher
from flux2_pipeline.paths import presign
from flux2_pipeline.resources import (
    Flux2Storage,
    LedgerResource,
    RunComfyResource,
    RunInterrupted,
)
from flux2_pipeline.runcomfy import PARAMETER_NAMES

CODE_VERSION = "1"
PREVIEW_ROWS = 8
FAILED_ROWS_NAMED = 5
PROGRESS_SECONDS = 5.0
"""How often a running step records its progress (an `AssetObservation`)."""
LOG_EVERY_TICKS = 6


def edits_retry_policy(max_retries: int = 3, delay: float = 10.0) -> RetryPolicy | None:
    """Re-runs a failed partition step; the ledger keeps completed rows from being paid again.

    Exponential backoff with jitter; None when `max_retries` is 0.
    """
    if max_retries <= 0:
        return None
    return RetryPolicy(
        max_retries=max_retries, delay=delay, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
    )


EDITS_RETRY_POLICY = edits_retry_policy()


def results_table_schema() -> TableSchema:
    """The results dataset's columns as a Dagster `TableSchema`."""
    return TableSchema(
        columns=[
            TableColumn(
                name=column.name,
                type=str(column.type),
                description=RESULT_COLUMN_DESCRIPTIONS.get(column.name),
            )
            for column in RESULTS_SCHEMA
        ]
    )


def results_column_lineage(keys: Flux2Keys) -> TableColumnLineage:
    """Which input columns each output column comes from."""

    def dep(*names: str) -> list[TableColumnDep]:
        return [TableColumnDep(asset_key=keys.prompt_tables, column_name=name) for name in names]

    lineage = {
        "row_id": dep("id", "prompt", "image_urls", *PARAMETER_NAMES),
        "prompt": dep("prompt"),
        "image_urls": dep("image_urls"),
        "warning": dep("image_urls"),
    }
    lineage.update({name: dep(name) for name in PARAMETER_NAMES})
    for produced in ("request_id", "status", "output_urls", "error", "cost_usd"):
        lineage[produced] = dep("prompt", "image_urls", *PARAMETER_NAMES)
    return TableColumnLineage(deps_by_column=lineage)


@dataclass
class _Tally:
    """Running figures of one partition run, kept small whatever the row count."""

    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    cost_usd: float = 0.0
    latencies: LatencySketch = field(default_factory=LatencySketch)
    preview: list[dict[str, Any]] = field(default_factory=list)
    failed_examples: list[str] = field(default_factory=list)
    failed_count: int = 0

    def add(self, outcome: RowOutcome) -> None:
        self.done += 1
        if outcome.status in ("failed", "cancelled"):
            self.failed_count += 1
        if outcome.cost_usd is not None and outcome.status == "completed":
            self.cost_usd += outcome.cost_usd
        if outcome.submitted_at and outcome.finished_at and outcome.status == "completed":
            self.latencies.add((outcome.finished_at - outcome.submitted_at).total_seconds())
        if len(self.preview) < PREVIEW_ROWS:
            self.preview.append(_preview_row(outcome))
        if outcome.status in ("failed", "cancelled") and len(self.failed_examples) < (
            FAILED_ROWS_NAMED
        ):
            self.failed_examples.append(f"{outcome.row.row_id}: {outcome.error}")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def progress_metadata(self, ledger_spent_usd: float | None = None) -> EditsProgress:
        """Rows done, failed and spend so far: what a progress bar or the UI shows."""
        return EditsProgress(
            rows_total=self.total,
            rows_done=self.done,
            rows_failed=self.failed_count,
            cost_usd=round(self.cost_usd, 6),
            seconds=round(self.seconds, 3),
            ledger_spent_usd=ledger_spent_usd,
        )

    def progress_line(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        share = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.done}/{self.total} rows done ({share:.0f}%), {rate:.1f} rows/s"

    def latency_figures(self) -> tuple[float | None, float | None]:
        return self.latencies.mean, self.latencies.quantile(0.95)


def _preview_row(outcome: RowOutcome) -> dict[str, Any]:
    prompt = (outcome.row.prompt or "")[:60]
    first_url = outcome.output_urls[0] if outcome.output_urls else ""
    return {
        "row_id": outcome.row.row_id,
        "status": outcome.status,
        "prompt": prompt,
        "output": first_url,
        "error": (outcome.error or "")[:80],
    }


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no rows_"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(row[name]).replace("|", "\\|").replace("\n", " ") for name in headers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class _Partition:
    """One partition of the step: where its rows come from and go, and how it went."""

    key: str
    in_path: UPath
    out_path: UPath
    read: InputRead
    """The input version this run works on; its results are committed only while it is current."""
    row_group: int
    runner: EditRunner
    tally: _Tally
    rows: Iterable[list[Any]]
    recount: Callable[[], Iterable[list[Any]]]
    """Reads the input again, for the run's estimate before its first submit."""
    writer: ResultsWriter | None = None
    outcome: PartitionOutcome | None = None
    estimate: EstimateMetadata = field(default_factory=EstimateMetadata)
    """The run's price, estimate and balance, on every partition."""

    @property
    def running(self) -> bool:
        return self.writer is not None and self.outcome is None


def _start_problem(
    estimate: RunEstimate, runcomfy: RunComfyResource, ledger: LedgerResource
) -> str | None:
    """Why the run must not submit anything, or None."""
    if estimate.balance_short and runcomfy.balance_check == "stop":
        return estimate.shortfall_error()
    if ledger.budget_usd is not None and estimate.price.price_usd is None and estimate.work.rows:
        return (
            f"FLUX2_BUDGET_USD needs a price per image and the model's published price could "
            f"not be read ({estimate.price.source}); set FLUX2_PRICE_PER_IMAGE_USD"
        )
    return None


def build_edits_asset(
    keys: Flux2Keys,
    partitions_def: DynamicPartitionsDefinition,
    *,
    group_name: str = "flux2",
    retry_policy: RetryPolicy | None = EDITS_RETRY_POLICY,
    pool: str | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
    partitions_per_run: int = DEFAULT_PARTITIONS_PER_RUN,
    single_run_backfills: bool = False,
    execute: ExecuteHook | None = None,
) -> AssetsDefinition:
    """The flux2_edits asset: one partition's prompt table in, its results dataset out.

    Use `build_flux2_definitions`, which names it; this builds the asset alone.
    """
    runcomfy_key, ledger_key, storage_key = (
        keys.resource("runcomfy"),
        keys.resource("ledger"),
        keys.resource("storage"),
    )

    @multi_asset(
        name=keys.edits.to_python_identifier(),
        specs=[
            AssetSpec(
                keys.edits,
                deps=[keys.prompt_tables],
                group_name=group_name,
                code_version=CODE_VERSION,
                kinds={"parquet"},
                metadata={"dagster/column_schema": results_table_schema()},
                description="FLUX.2 [dev] edits of one prompt table: one row per input row with "
                "the request id, status, result image URLs and effective parameters.",
            )
        ],
        check_specs=edits_check_specs(keys, partitions_def),
        can_subset=True,
        partitions_def=partitions_def,
        retry_policy=retry_policy,
        backfill_policy=ranged_backfills(partitions_per_run, single_run=single_run_backfills),
        pool=pool,
        required_resource_keys={runcomfy_key, ledger_key, storage_key},
    )
    @with_execute("flux2_edits", execute)
    def flux2_edits(
        context: AssetExecutionContext,
    ) -> Iterator[AssetMaterialization | MaterializeResult[None] | AssetCheckResult]:
        """Run the partitions' edit jobs and write each one's results dataset and checks."""
        runcomfy: RunComfyResource = getattr(context.resources, runcomfy_key)
        ledger: LedgerResource = getattr(context.resources, ledger_key)
        storage: Flux2Storage = getattr(context.resources, storage_key)
        yield from EditsStep(context, keys, runcomfy, ledger, storage, progress_seconds).run()

    return flux2_edits


class EditsStep:
    """One run of the edits step over its partitions (one, or a backfill's range).

    The partitions' rows run on the client's loop; the lines, check results and progress
    they produce are logged from the step's own thread, woken (`ready`) as soon as one is
    ready, so each log event (a database commit) is made while other rows go on.

    Example::

        yield from EditsStep(context, keys, runcomfy, ledger, storage).run()
    """

    def __init__(
        self,
        context: AssetExecutionContext,
        keys: Flux2Keys,
        runcomfy: RunComfyResource,
        ledger: LedgerResource,
        storage: Flux2Storage,
        progress_seconds: float = PROGRESS_SECONDS,
    ) -> None:
        self.context, self.keys, self.progress_seconds = context, keys, progress_seconds
        self.runcomfy, self.ledger, self.storage = runcomfy, ledger, storage
        # Read once: each `context.partition_keys` asks the instance for the partitions.
        self.keys_in_run = list(context.partition_keys)
        self.ranged = len(self.keys_in_run) > 1
        self.check_names = [
            check.name
            for check in EDITS_CHECKS
            if AssetCheckKey(keys.edits, check.name) in context.selected_asset_check_keys
        ]
        self.found = PartitionChecks(keys.edits, ranged=self.ranged, log_event=context.log_event)
        # What the partitions share: the in-flight limit, its wakeup, the account's refusal.
        self.slots, self.wakeup = asyncio.Semaphore(runcomfy.max_concurrency), SlotWakeup()
        self.account_stop = AccountStop()
        self.partitions: list[_Partition] = []
        self.outcomes: dict[str, PartitionOutcome] = {}
        """Each partition's outcome; until the rows are done, those whose input was unreadable."""
        self.finished_lines: deque[str] = deque()
        self.checked: deque[tuple[_Partition, list[AssetCheckResult]]] = deque()
        self.noted: set[str] = set()
        """The partitions whose metadata `context.add_asset_metadata` already has."""
        self.ready = threading.Event()
        self.ticks = 0
        self.next_progress = 0.0

    def run(self) -> Iterator[AssetMaterialization | MaterializeResult[None] | AssetCheckResult]:
        """Run the partitions' rows, then yield each one's materialization or failure and
        the checks' results."""
        if self.keys.edits not in self.context.selected_asset_keys:
            # Checks selected alone (the UI's "Execute" on a check): evaluate, pay nothing.
            for key in self.keys_in_run:
                for result in evaluate_edits_checks(
                    self.storage, self.keys.edits, key, self.check_names
                ):
                    self.found.add(key, str(result.check_name), result)
            yield from self.found.step_results()
            return
        for key in self.keys_in_run:
            prepared = self._prepare(key)
            if isinstance(prepared, PartitionOutcome):
                self.outcomes[key] = prepared
            else:
                self.partitions.append(prepared)
        if self.ranged:
            rows = sum(partition.tally.total for partition in self.partitions)
            self.context.log.info(
                f"{len(self.keys_in_run)} partitions ({self.keys_in_run[0]} to "
                f"{self.keys_in_run[-1]}), {rows} rows from {self.storage.input_dir}"
            )
        stopped = self._run_rows()
        self._log_finished()
        yield from materialize_outcomes(
            self.context,
            self.keys.edits,
            self._final_outcomes(),
            stopped=stopped,
            check_results=self.found.step_results(),
            metadata_added=self.noted,
        )

    def _prepare(self, key: str) -> _Partition | PartitionOutcome:
        """A partition ready to run, or the failure of one whose input cannot be read."""
        in_path, out_path = self.storage.input_path(key), self.storage.results_path(key)
        try:
            total, row_group = input_shape(in_path)
            input_sha = file_sha256(in_path)
        except (InputTableError, OSError) as exc:
            failure = Failure(description=f"partition {key}: {exc}", allow_retries=False)
            return PartitionOutcome(key, {}, failure)
        log = self.context.log
        if not self.ranged:
            log.info(f"partition {key}: {total} rows from {in_path} (sha256 {input_sha[:12]})")
        if row_group > LARGE_ROW_GROUP_ROWS:
            log.warning(
                f"partition {key}: {in_path.name} has a row group of {row_group} rows; it is "
                "decoded whole while its rows stream out, so memory grows with it. Write input "
                f"tables with row groups of at most {LARGE_ROW_GROUP_ROWS} rows."
            )
        read = functools.partial(
            read_input_rows,
            in_path,
            defaults=self.runcomfy.parameter_defaults(),
            sign_url=functools.partial(presign, expires=self.runcomfy.presign_expiry),
        )
        version, runner = InputRead.now(input_sha), self._runner(key)
        return _Partition(
            key, in_path, out_path, version, row_group, runner, _Tally(total), read(), read
        )

    def _runner(self, partition: str) -> EditRunner:
        """The one place the configured resources become an `EditRunner`."""
        runcomfy, ledger = self.runcomfy, self.ledger
        return EditRunner(
            runcomfy.client,
            ledger.ledger,
            partition=partition,
            max_concurrency=runcomfy.max_concurrency,
            attempts_per_run=runcomfy.attempts_per_run,
            max_attempts=runcomfy.max_attempts,
            lease_seconds=ledger.lease_seconds,
            slots=self.slots,
            wakeup=self.wakeup,
            account_stop=self.account_stop,
            account_concurrency=runcomfy.account_concurrency,
            budget_usd=ledger.budget_usd,
            price_per_image_usd=runcomfy.price_per_image_usd,
        )

    def _run_rows(self) -> bool:
        """Run the prepared partitions' rows to their outcomes; True if the run was stopped."""
        self.next_progress = time.monotonic() + self.progress_seconds
        try:
            self.runcomfy.run(
                self._estimate_then_run(),
                on_tick=self._on_tick,
                tick_seconds=self.progress_seconds,
                wake=self.ready,
            )
        except RunInterrupted:
            for partition in self.partitions:
                # A lone partition reports the stop even if its last row just finished.
                if partition.outcome is None or not self.ranged:
                    partition.outcome = _interrupted(partition)
            return True
        return False

    async def _estimate_then_run(self) -> None:
        """Price, estimate and balance first (see `flux2_pipeline.batch.estimate`); then the
        rows, unless the balance cannot cover them under FLUX2_BALANCE_CHECK=stop."""
        partitions, runcomfy = self.partitions, self.runcomfy
        if not partitions:
            return
        price = await quote_price(runcomfy.client, runcomfy.price_per_image_usd)
        # On the loop's own thread, before any job of the step exists: read on another
        # thread, the tables would be decoded into that thread's malloc arena, a peak the
        # rows' own read then adds to instead of reusing.
        work = unpaid_work(
            [(partition.key, rows_while_readable(partition.recount)) for partition in partitions],
            self.ledger.ledger,
        )
        estimate = await estimate_run(runcomfy.client, work, price, runcomfy.balance_check)
        self._note(f"before the first submit: {estimate.line()}")
        figures = EstimateMetadata.of(estimate)
        for partition in partitions:
            partition.estimate = figures
            partition.runner.price_per_image_usd = price.price_usd
        problem = _start_problem(estimate, runcomfy, self.ledger)
        if problem is None and estimate.balance_short:
            self._note(
                f"warning: {estimate.shortfall_error()} (FLUX2_BALANCE_CHECK=warn: going on)"
            )
        if problem is None:
            await self._run_partitions(AddressPolicy.for_api(runcomfy.base_url))
            return
        self._note(f"not started: {problem}")
        for partition in partitions:
            failure = Failure(
                description=f"partition {partition.key}: not started: {problem}",
                metadata=dict(figures),
                allow_retries=False,
            )
            partition.outcome = PartitionOutcome(partition.key, {}, failure)

    async def _run_partitions(self, policy: AddressPolicy) -> None:
        """Run the partitions' rows under one in-flight limit, each written to its own file.

        A partition starts as soon as the one before it has read its last input row, so the
        limit stays full across partition boundaries while only a few partitions are open.
        A partition whose input turns out to be unreadable fails alone. Once a partition's
        file is written, `_finish` gives its outcome and `_check` (on a worker thread, so the
        other partitions' rows go on) evaluates its checks.
        """
        # Reference images are checked through the one guarded fetcher before rows are paid.
        async with GuardedFetcher(policy) as fetcher:
            check = ReferenceCheck(fetcher.probe)
            running: list[asyncio.Task[None]] = []
            try:
                for partition in self.partitions:
                    all_read = asyncio.Event()
                    partition.runner.preflight = check
                    running.append(asyncio.create_task(self._run_one(partition, all_read)))
                    await all_read.wait()
                    if any(task.done() and task.exception() for task in running):
                        break
                await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
                for task in running:
                    if task.done():
                        task.result()  # an unexpected failure ends every partition
            finally:
                # Each task is cancelled once, here (asyncio.wait never cancels): a second
                # cancel would cut short its cleanup, the API cancels of its queued jobs.
                for task in running:
                    task.cancel()
                if running:
                    await asyncio.wait(running)

    async def _run_one(self, partition: _Partition, all_read: asyncio.Event) -> None:
        """One partition's rows into its file, then its outcome and its checks."""

        def rows() -> Iterator[list[Any]]:
            try:
                yield from partition.rows
            finally:
                all_read.set()

        writer = partition.writer = ResultsWriter(partition.out_path)
        try:
            async for outcome in partition.runner.run(rows()):
                partition.tally.add(outcome)
                writer.write([outcome])
        except InputTableError as exc:
            writer.abort()
            partition.outcome = PartitionOutcome(
                partition.key,
                {},
                Failure(description=f"partition {partition.key}: {exc}", allow_retries=False),
            )
            return
        except BaseException:
            writer.abort()
            raise
        finally:
            all_read.set()
        try:
            # Off the loop: the input is hashed again, and another run's commit may hold the lock.
            await asyncio.to_thread(commit_for_input, writer, partition.in_path, partition.read)
        except InputChanged as exc:
            partition.outcome = _input_changed(partition, exc)
            return
        partition.outcome = self._finish(partition)
        await asyncio.to_thread(self._check, partition)

    def _final_outcomes(self) -> list[PartitionOutcome]:
        """Every partition's outcome in the run's order, once its rows are done."""
        for partition in self.partitions:
            assert partition.outcome is not None, "every partition ends with an outcome"
            if partition.outcome.failure is None:
                # A newer run's commit since ours: its materialization, not ours, is the latest.
                changed = superseded(partition.out_path, partition.read)
                if changed is not None:
                    partition.outcome = _input_changed(partition, changed)
            self.outcomes[partition.key] = partition.outcome
        return [self.outcomes[key] for key in self.keys_in_run]

    def _finish(self, partition: _Partition) -> PartitionOutcome:
        """On the loop: a partition's file is written; its line waits for `_log_finished`."""
        self.finished_lines.append(
            f"partition {partition.key}: {partition.tally.progress_line()}; results in "
            f"{partition.out_path}"
        )
        return _outcome(self.keys, partition)

    def _note(self, line: str) -> None:
        self.finished_lines.append(line)
        self.ready.set()

    def _check(self, partition: _Partition) -> None:
        """On a worker thread: the checks' results on a partition's file just written; a
        check that cannot read it fails with the error (the rows are paid for and written)."""
        names, edits = self.check_names, self.keys.edits
        try:
            results = evaluate_edits_checks(self.storage, edits, partition.key, names)
        except Exception as exc:  # an unreadable file fails its checks, not the paid-for rows
            description = (
                f"partition {partition.key}: the check could not read {partition.out_path}: {exc}"
            )
            results = [
                AssetCheckResult(
                    passed=False,
                    asset_key=edits,
                    check_name=name,
                    severity=AssetCheckSeverity.ERROR,
                    description=description,
                )
                for name in names
            ]
        self.checked.append((partition, results))
        self.ready.set()

    def _on_tick(self) -> None:
        self._log_finished()
        if time.monotonic() >= self.next_progress:
            self.next_progress = time.monotonic() + self.progress_seconds
            self._report_progress()

    def _log_finished(self) -> None:
        # One log event for every partition finished since the last: each event is a
        # database commit, a real cost over the partitions of a ranged run.
        lines = [self.finished_lines.popleft() for _ in range(len(self.finished_lines))]
        if lines:
            self.context.log.info("\n".join(lines))
        while self.checked:
            partition, results = self.checked.popleft()
            for result in results:
                self.found.add(partition.key, str(result.check_name), result)
            outcome = partition.outcome
            if self.ranged and outcome is not None and outcome.failure is None:
                # Dagster checks the key against the run's partitions, a query of the
                # instance, on every call: made now, while other partitions' jobs
                # still run, rather than for them all at the step's end.
                metadata = dict(outcome.metadata)
                self.context.add_asset_metadata(metadata, partition_key=partition.key)
                self.noted.add(partition.key)

    def _report_progress(self) -> None:
        """A progress observation for every running partition; a log line every few."""
        running = [partition for partition in self.partitions if partition.running]
        if not running:
            return
        spent = round(self.ledger.ledger.spent_usd(), 6)
        for partition in running:
            figures = partition.tally.progress_metadata(ledger_spent_usd=spent)
            self.context.log_event(
                AssetObservation(
                    asset_key=self.keys.edits, partition=partition.key, metadata=dict(figures)
                )
            )
        self.ticks += 1
        if self.ticks % LOG_EVERY_TICKS == 0:
            for partition in running:
                self.context.log.info(
                    f"partition {partition.key}: {partition.tally.progress_line()}, ledger "
                    f"spend {spent:.4f} USD"
                )


def _outcome(keys: Flux2Keys, partition: _Partition) -> PartitionOutcome:
    """A finished partition's metadata; a failure if any valid row did not complete."""
    runner, tally, key = partition.runner, partition.tally, partition.key
    counts = runner.counters.by_status
    metadata = _metadata(keys, partition)
    unfinished = counts["failed"] + counts["cancelled"]
    if not unfinished:
        return PartitionOutcome(key, metadata)
    # Rows that failed because of their input, the budget or the attempt cap fail
    # the same way on a step retry: only a re-run after a fix can help.
    retryable = unfinished > runner.counters.final_failures
    refusal = runner.account_stop.reason
    failure = Failure(
        allow_retries=retryable,
        description=(
            f"partition {key}: "
            + (f"the account refused further jobs: {refusal}; " if refusal else "")
            + f"{unfinished} of {tally.total} rows did not complete "
            f"({counts['failed']} failed, {counts['cancelled']} cancelled, "
            f"{counts['completed']} completed, {counts['invalid']} invalid); results "
            f"written to {partition.out_path}. First: " + " | ".join(tally.failed_examples)
        ),
        metadata=metadata,
    )
    return PartitionOutcome(key, metadata, failure)


def _input_changed(partition: _Partition, exc: InputChanged) -> PartitionOutcome:
    """The partition's input was replaced while it ran: fail it without writing its results.

    Its paid rows are in the ledger; the run for the new version reuses the unchanged ones.
    """
    failure = Failure(
        description=f"partition {partition.key}: {exc}",
        metadata={
            **InputMetadata(input_sha256=exc.old, input_sha256_now=exc.new or ""),
            **partition.tally.progress_metadata(),
        },
        allow_retries=False,
    )
    return PartitionOutcome(partition.key, {}, failure)


def _interrupted(partition: _Partition) -> PartitionOutcome:
    tally = partition.tally
    failure = Failure(
        description=f"partition {partition.key}: the run was stopped after {tally.done} of "
        f"{tally.total} rows; queued jobs were cancelled, running ones are left in the "
        "ledger for the next run to poll",
        metadata={**StepFailureMetadata(interrupted=True), **tally.progress_metadata()},
        allow_retries=False,
    )
    return PartitionOutcome(partition.key, {}, failure)


def _metadata(keys: Flux2Keys, partition: _Partition) -> dict[str, Any]:
    runner, tally, counters = partition.runner, partition.tally, partition.runner.counters
    counts, seconds = counters.by_status, tally.seconds
    mean, p95 = tally.latency_figures()
    return {
        "dagster/row_count": tally.done,
        "dagster/column_schema": results_table_schema(),
        "dagster/column_lineage": results_column_lineage(keys),
        **EditsMetadata(
            completed=counts["completed"],
            failed=counts["failed"],
            invalid=counts["invalid"],
            cancelled=counts["cancelled"],
            cost_usd=round(tally.cost_usd, 6),
            latency_mean_s=mean,
            latency_p95_s=p95,
            submitted=counters.submitted,
            reused_completed=counters.reused_completed,
            polled_known=counters.polled_known,
            unknown_resubmitted=counters.unknown_resubmitted,
            outcome_unknown=counters.outcome_unknown,
            waited_for_claim=counters.waited_for_claim,
            not_submitted_references=counters.not_submitted_references,
            over_budget=counters.over_budget,
            account_refused=counters.account_refused,
            new_spend_usd=round(counters.new_cost_usd, 6),
            ledger_spent_usd=round(runner.ledger.spent_usd(), 6),
            seconds=round(seconds, 3),
            rows_per_second=round(tally.done / seconds, 2) if seconds > 0 else 0.0,
            input_path=MetadataValue.path(str(partition.in_path)),
            input_sha256=partition.read.sha256,
            input_largest_row_group=partition.row_group,
            results_path=MetadataValue.path(str(partition.out_path)),
            preview=MetadataValue.md(_markdown_table(tally.preview)),
            partition=partition.key,
            account_refusal=runner.account_stop.reason,
        ),
        URI: storage_uri(partition.out_path),
        **partition.estimate,
    }
