"""Runs a stream of input rows through the API with the ledger in the loop.

For each valid row the runner asks the ledger first:

- a completed job is reused (no API call);
- a job that may still complete (`submitted`) is polled, never resubmitted;
- otherwise the row is submitted, with an intent committed before the request
  leaves and the request id committed the moment the answer arrives;
- a job that ends failed or cancelled is submitted again, at most
  `attempts_per_run` times in this run and `max_attempts` times in all.

Outcomes come back in input order while at most `max_concurrency` jobs are in
flight and at most `window` rows are held in memory.

Example::

    runner = EditRunner(client, ledger, partition="cats", max_concurrency=8)
    async for outcome in runner.run(read_rows()):
        print(outcome.row.row_id, outcome.status)
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flux2_pipeline.batch.tables import InputRow, RowOutcome
from flux2_pipeline.ledger import Ledger, RowHistory, Submission, SubmissionState, make_row_key
from flux2_pipeline.runcomfy import (
    AsyncRunComfyClient,
    AuthenticationError,
    EditRequest,
    EditResult,
    InsufficientCreditError,
    JobDeadlineExceeded,
    JobState,
    NotFoundError,
    RunComfyError,
    SubmissionOutcomeUnknown,
)

logger = logging.getLogger(__name__)

COMPLETED, FAILED, INVALID, CANCELLED = "completed", "failed", "invalid", "cancelled"
STATUSES = (COMPLETED, FAILED, INVALID, CANCELLED)


class FatalApiError(RuntimeError):
    """An API answer that will fail every row the same way (bad token, no credit)."""


@dataclass(slots=True)
class RunCounters:
    """What the runner did, for metadata and logs."""

    submitted: int = 0
    reused_completed: int = 0
    polled_known: int = 0
    unknown_resubmitted: int = 0
    outcome_unknown: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))


class EditRunner:
    """Ledger-guarded, order-preserving, bounded-concurrency execution of edit rows."""

    def __init__(
        self,
        client: AsyncRunComfyClient,
        ledger: Ledger,
        *,
        partition: str,
        max_concurrency: int = 8,
        attempts_per_run: int = 3,
        max_attempts: int = 9,
        window: int | None = None,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.partition = partition
        self.attempts_per_run = attempts_per_run
        self.max_attempts = max_attempts
        self.window = window or max(256, 8 * max_concurrency)
        self.counters = RunCounters()
        self._slots = asyncio.Semaphore(max_concurrency)

    async def run(self, batches: Iterable[list[InputRow]]) -> AsyncIterator[RowOutcome]:
        """Yield one outcome per input row, in input order."""
        pending: deque[asyncio.Task[RowOutcome]] = deque()
        try:
            for batch in batches:
                histories = self._lookup(batch)
                for row in batch:
                    pending.append(asyncio.ensure_future(self._row(row, histories)))
                    while len(pending) >= self.window or (pending and pending[0].done()):
                        yield self._count(await pending.popleft())
                # Let the tasks of this batch start before reading the next one.
                await asyncio.sleep(0)
            while pending:
                yield self._count(await pending.popleft())
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def _count(self, outcome: RowOutcome) -> RowOutcome:
        self.counters.by_status[outcome.status] += 1
        return outcome

    def _key(self, row: InputRow, request: EditRequest) -> str:
        return make_row_key(self.partition, row.row_id, _fingerprint(row, request))

    def _lookup(self, batch: list[InputRow]) -> dict[str, RowHistory]:
        keys = [self._key(row, row.request) for row in batch if row.request is not None]
        return self.ledger.lookup(keys) if keys else {}

    async def _row(self, row: InputRow, histories: dict[str, RowHistory]) -> RowOutcome:
        request = row.request
        if request is None:
            return RowOutcome(row, INVALID, error=row.invalid_reason)
        key = self._key(row, request)
        history = histories.get(key)
        paid = history.paid_attempts if history else 0
        unknown_before = history is not None and history.dangling_intent is not None
        last: RowOutcome | None = None

        if history is not None and (known := history.live) is not None:
            if known.state is SubmissionState.COMPLETED and known.output_urls:
                self.counters.reused_completed += 1
                return _from_submission(row, known, paid)
            self.counters.polled_known += 1
            last, may_resubmit = await self._follow(row, known, paid)
            if not may_resubmit:
                return last

        tries = 0
        while tries < self.attempts_per_run and paid < self.max_attempts:
            tries += 1
            if unknown_before:
                self.counters.unknown_resubmitted += 1
                unknown_before = False
            last, may_resubmit, paid = await self._submit_and_follow(row, key, request, paid)
            if not may_resubmit:
                return last
        if last is None:
            return RowOutcome(
                row,
                FAILED,
                attempts=paid,
                error=f"not submitted: the row already used {paid} of {self.max_attempts} "
                "paid attempts",
            )
        return last

    async def _submit_and_follow(
        self, row: InputRow, key: str, request: EditRequest, paid: int
    ) -> tuple[RowOutcome, bool, int]:
        """One paid attempt; returns the outcome, whether a resubmit may help, paid count."""
        async with self._slots:
            intent = self.ledger.record_intent(
                key, self.partition, row.row_id, _fingerprint(row, request)
            )
            try:
                handle = await self.client.submit(request)
            except SubmissionOutcomeUnknown as exc:
                self.ledger.record_unknown(intent.id, str(exc))
                self.counters.outcome_unknown += 1
                error = f"{exc}; a re-run will submit it again and count a possible duplicate"
                return RowOutcome(row, FAILED, attempts=paid + 1, error=error), False, paid + 1
            except (AuthenticationError, InsufficientCreditError) as exc:
                self.ledger.record_rejected(intent.id, str(exc))
                raise FatalApiError(str(exc)) from exc
            except RunComfyError as exc:
                self.ledger.record_rejected(intent.id, str(exc))
                refused = RowOutcome(row, FAILED, attempts=paid, error=f"submit refused: {exc}")
                return refused, False, paid
            submitted_at = datetime.now(UTC)
            known = self.ledger.record_submitted(intent.id, handle.request_id, submitted_at)
            self.counters.submitted += 1
            paid += 1
            outcome, may_resubmit = await self._follow_locked(row, known, paid)
            return outcome, may_resubmit, paid

    async def _follow(self, row: InputRow, known: Submission, paid: int) -> tuple[RowOutcome, bool]:
        async with self._slots:
            return await self._follow_locked(row, known, paid)

    async def _follow_locked(
        self, row: InputRow, known: Submission, paid: int
    ) -> tuple[RowOutcome, bool]:
        """Poll a known job to its end; True when it surely ended without a result."""
        request_id = known.request_id
        assert request_id is not None
        try:
            result = await self.client.wait(request_id, submitted_at=known.submitted_at)
        except asyncio.CancelledError:
            await self._settle_after_cancel(known)
            raise
        except JobDeadlineExceeded as exc:
            if await self._settle_after_cancel(known) is JobState.CANCELLED:
                return _pending(row, known, paid, CANCELLED, str(exc)), True
            return _pending(row, known, paid, FAILED, str(exc), live=True), False
        except NotFoundError as exc:
            self.ledger.record_finished(
                known.id, SubmissionState.FAILED, error=f"the API no longer knows this job: {exc}"
            )
            return _pending(row, known, paid, FAILED, f"the API no longer knows job: {exc}"), True
        except RunComfyError as exc:
            # The job may still complete: leave it `submitted` so a re-run polls it.
            lost = _pending(row, known, paid, FAILED, f"lost track of the job: {exc}", live=True)
            return lost, False
        outcome = self._record_result(row, known, paid, result)
        return outcome, outcome.status != COMPLETED

    def _record_result(
        self, row: InputRow, known: Submission, paid: int, result: EditResult
    ) -> RowOutcome:
        if result.ok:
            state, status = SubmissionState.COMPLETED, COMPLETED
        elif result.state is JobState.CANCELLED:
            state, status = SubmissionState.CANCELLED, CANCELLED
        else:
            state, status = SubmissionState.FAILED, FAILED
        error = None if result.ok else result.error or f"the job ended {result.state.value}"
        finished_at = result.finished_at or datetime.now(UTC)
        self.ledger.record_finished(
            known.id,
            state,
            finished_at=finished_at,
            error=error,
            cost_usd=result.cost_usd,
            output_urls=result.output_urls if result.ok else (),
        )
        return RowOutcome(
            row,
            status,
            request_id=known.request_id,
            output_urls=result.output_urls if result.ok else (),
            error=error,
            attempts=paid,
            submitted_at=known.submitted_at,
            finished_at=finished_at,
            cost_usd=result.cost_usd,
        )

    async def _settle_after_cancel(self, known: Submission) -> JobState | None:
        """After giving up on a job, record `cancelled` only if the API confirms it."""
        assert known.request_id is not None
        try:
            async with asyncio.timeout(5):
                status = await self.client.status(known.request_id)
        except (RunComfyError, TimeoutError):
            return None
        if status.state is JobState.CANCELLED:
            self.ledger.record_finished(
                known.id, SubmissionState.CANCELLED, error="cancelled: the run stopped waiting"
            )
        return status.state


def _fingerprint(row: InputRow, request: EditRequest) -> str:
    # The row as written: signed URLs change on every run, the job they ask for does not.
    return row.fingerprint or request.fingerprint()


def _pending(
    row: InputRow, known: Submission, paid: int, status: str, error: str, *, live: bool = False
) -> RowOutcome:
    message = f"{error}; a re-run will poll request {known.request_id}" if live else error
    return RowOutcome(
        row,
        status,
        request_id=known.request_id,
        error=message,
        attempts=paid,
        submitted_at=known.submitted_at,
    )


def _from_submission(row: InputRow, done: Submission, paid: int) -> RowOutcome:
    return RowOutcome(
        row,
        COMPLETED,
        request_id=done.request_id,
        output_urls=done.output_urls,
        attempts=paid,
        submitted_at=done.submitted_at,
        finished_at=done.finished_at,
        cost_usd=done.cost_usd,
    )
