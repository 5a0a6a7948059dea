"""Runs a stream of input rows through the API with the ledger's claims in the loop.

For each valid row the runner asks the ledger who pays (`Ledger.claim`, one locked
transaction; see `flux2_pipeline.ledger.claims`):

- a completed job is reused (no API call);
- a job that may still complete (`submitted`, by anyone) is polled, never resubmitted;
- a row another live runner is submitting right now is waited for, then followed;
- otherwise the ledger records our intent (durable before the request leaves) and we
  submit, after checking that the row's reference images can be fetched;
- a job that ends failed or cancelled is submitted again, at most `attempts_per_run`
  times in this run and `max_attempts` times in all, unless its failure shows that the
  input is at fault.

An answer to a submit that does not prove that no job exists is recorded `unknown`:
paid, counted, capped, and resubmitted only by a later run, which counts it in
`unknown_resubmitted`. With a budget, every job reserves its price when its intent is
written, so jobs in flight can never take the spend over the budget.

Outcomes come back in input order while at most `max_concurrency` jobs are in flight
and at most `window` rows are held in memory.

Example::

    runner = EditRunner(client, ledger, partition="cats", max_concurrency=8)
    async for outcome in runner.run(read_input_rows(path)):
        print(outcome.row.row_id, outcome.status)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum

from flux2_pipeline.batch.account_stop import AccountStop
from flux2_pipeline.batch.group_commit import GroupCommit
from flux2_pipeline.batch.preflight import ReferenceCheck
from flux2_pipeline.batch.tables import InputRow, RowOutcome, RowStatus
from flux2_pipeline.batch.wakeup import SlotWakeup
from flux2_pipeline.ledger import (
    DEFAULT_LEASE_SECONDS,
    ClaimAction,
    ClaimDecision,
    ClaimRequest,
    Ledger,
    RowHistory,
    Submission,
    SubmissionState,
    make_row_key,
)
from flux2_pipeline.net import redact_text
from flux2_pipeline.runcomfy import (
    AccountRefusedError,
    APIError,
    AsyncRunComfyClient,
    EditRequest,
    EditResult,
    JobDeadlineExceeded,
    JobState,
    NotFoundError,
    RunComfyError,
    SubmissionOutcomeUnknown,
    failure_blames_input,
    is_account_refusal,
)

logger = logging.getLogger(__name__)

COMPLETED, FAILED, INVALID, CANCELLED = (
    RowStatus.COMPLETED,
    RowStatus.FAILED,
    RowStatus.INVALID,
    RowStatus.CANCELLED,
)
STATUSES = tuple(RowStatus)

NOT_SENT_STOPPED = "not sent: the run stopped before this row's request left"

ADOPT_EVERY_S = 1.0
"""How often a runner whose rows wait for an account slot looks for jobs of dead runs."""

WAIT_FIRST_S = 0.05
WAIT_MAX_S = 1.0
"""How often a row waiting for another runner's claim or an account slot asks again."""

STOP_WRITE_GRACE_S = 10.0
"""How long a stopped run still tries to record a request id the API gave it."""


@dataclass(slots=True)
class RunCounters:
    """What the runner did, for metadata and logs."""

    submitted: int = 0
    reused_completed: int = 0
    polled_known: int = 0
    waited_for_claim: int = 0
    unknown_resubmitted: int = 0
    outcome_unknown: int = 0
    not_submitted_references: int = 0
    over_budget: int = 0
    account_refused: int = 0
    """Rows not sent because the account was refused (no balance, token, permission)."""
    adopted_orphans: int = 0
    """Jobs of runs that died, followed here to their end to free their account slots."""
    new_cost_usd: float = 0.0
    """What the jobs this run submitted cost, as the API reported (reused jobs excluded)."""
    final_failures: int = 0
    """Failed rows that another try cannot fix (input at fault, budget, attempt cap)."""
    by_status: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))


@dataclass(slots=True)
class _RowRun:
    """One row's progress within this run."""

    paid: int = 0
    tries: int = 0
    last: RowOutcome | None = None
    may_be_duplicate: bool = False
    waits: int = 0


class EditRunner:
    """Ledger-claimed, order-preserving, bounded-concurrency execution of edit rows.

    Args:
        client: the live API client.
        ledger: the ledger shared with every other runner that may run these rows.
        partition: the partition key; part of every row's ledger key.
        max_concurrency: most jobs this runner has in flight.
        attempts_per_run: paid submissions per row within this run.
        max_attempts: paid submissions per row across all runs.
        lease_seconds: how long this runner's claims outlive its last heartbeat.
        budget_usd: most the ledger may spend, over every run sharing it.
        price_per_image_usd: the price reserved per output image (required with a budget, by
            the time `run` starts).
        account_concurrency: most open jobs over every runner sharing the ledger.
        preflight: checks reference images before a row is paid for.
        slots: the in-flight limit, when several runners of one process share one
            (the partitions of one ranged run); else `max_concurrency` of its own.
        wakeup: wakes rows waiting for an account slot when a job ends, shared the
            same way; else one of its own.
        account_stop: once the account is refused, no runner sharing it submits again;
            shared the same way; else one of its own.
        wait_first_s, wait_max_s: a row waiting for another runner's claim or an account
            slot asks again after `wait_first_s`, then 1.5 times later each time, up to
            `wait_max_s` (a freed slot of this process wakes it at once).
        stop_write_grace_s: how long a stopped run still tries to record a request id
            the API gave it before it goes to the ledger's spill file.
    """

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
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        budget_usd: float | None = None,
        price_per_image_usd: float | None = None,
        account_concurrency: int | None = None,
        preflight: ReferenceCheck | None = None,
        slots: asyncio.Semaphore | None = None,
        wakeup: SlotWakeup | None = None,
        account_stop: AccountStop | None = None,
        wait_first_s: float = WAIT_FIRST_S,
        wait_max_s: float = WAIT_MAX_S,
        stop_write_grace_s: float = STOP_WRITE_GRACE_S,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.partition = partition
        self.attempts_per_run = attempts_per_run
        self.max_attempts = max_attempts
        self.window = window or max(256, 8 * max_concurrency)
        self.lease_seconds = lease_seconds
        self.budget_usd = budget_usd
        self.price_per_image_usd = price_per_image_usd
        self.account_concurrency = account_concurrency
        self.preflight = preflight
        self.wait_first_s, self.wait_max_s = wait_first_s, wait_max_s
        self.stop_write_grace_s = stop_write_grace_s
        self.holder = f"runner-{uuid.uuid4().hex}"
        self.started_at = datetime.now(UTC)
        """Account refusals recorded in the ledger since then stop this runner's submits."""
        self.counters = RunCounters()
        self._write = GroupCommit(ledger)
        self._slots = slots or asyncio.Semaphore(max_concurrency)
        self._wakeup = wakeup or SlotWakeup()
        self.account_stop = account_stop or AccountStop()
        self._orphans: set[asyncio.Task[None]] = set()
        self._next_adoption = 0.0

    async def run(self, batches: Iterable[list[InputRow]]) -> AsyncIterator[RowOutcome]:
        """Yield one outcome per input row, in input order.

        Under a budget the price must be known by now (set `price_per_image_usd`, from the
        setting or the model's published price): a job's price is reserved as it leaves.
        """
        if self.budget_usd is not None and self.price_per_image_usd is None:
            raise ValueError(
                "FLUX2_BUDGET_USD needs a price per image: the model's published price could "
                "not be read; set FLUX2_PRICE_PER_IMAGE_USD"
            )
        pending: deque[asyncio.Task[RowOutcome]] = deque()
        heartbeat = asyncio.ensure_future(self._heartbeat())
        try:
            for batch in batches:
                keys = [self._key(row) for row in batch]
                done = self._completed_in(keys)
                for row, key in zip(batch, keys, strict=True):
                    pending.append(asyncio.ensure_future(self._row(row, key, done)))
                    while len(pending) >= self.window or (pending and pending[0].done()):
                        yield self._count(await _first_done(pending))
                # Let the tasks of this batch start before reading the next one.
                await asyncio.sleep(0)
            while pending:
                yield self._count(await _first_done(pending))
            # Jobs adopted from dead runs hold account slots: see them to their end.
            await asyncio.gather(*self._orphans, return_exceptions=True)
        finally:
            heartbeat.cancel()
            for task in (*pending, *self._orphans):
                task.cancel()
            await asyncio.gather(heartbeat, *pending, *self._orphans, return_exceptions=True)

    def _count(self, outcome: RowOutcome) -> RowOutcome:
        self.counters.by_status[outcome.status] += 1
        return outcome

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:  # off the loop: a ledger waiting for a lock must not stop polls
                await asyncio.to_thread(self.ledger.renew, self.holder, self.lease_seconds)
            except Exception as exc:  # the next beat may succeed; claims outlive one miss
                logger.warning("could not renew this run's ledger claims: %s", exc)

    def _key(self, row: InputRow) -> str | None:
        """The row's ledger key; None for an invalid row."""
        if row.request is None:
            return None
        return make_row_key(self.partition, row.row_id, _fingerprint(row, row.request))

    def _completed_in(self, keys: list[str | None]) -> dict[str, RowHistory]:
        # A read-only look first: completed rows (every row of a re-run) need no claim.
        valid = [key for key in keys if key is not None]
        return self.ledger.lookup(valid) if valid else {}

    async def _row(
        self, row: InputRow, key: str | None, known: dict[str, RowHistory]
    ) -> RowOutcome:
        request = row.request
        if request is None or key is None:
            return RowOutcome(row, INVALID, error=row.invalid_reason)
        history = known.get(key)
        if history is not None and (done := history.completed) is not None and done.output_urls:
            self.counters.reused_completed += 1
            return _from_submission(row, done, history.paid_attempts)
        claim = ClaimRequest(
            key,
            self.partition,
            row.row_id,
            _fingerprint(row, request),
            price_usd=self._price(request),
        )
        state = _RowRun()
        wait = self.wait_first_s
        while True:
            async with self._slots:
                outcome = await self._step(row, request, claim, state)
            if isinstance(outcome, RowOutcome):
                return outcome
            if outcome is _WAIT:
                await asyncio.sleep(wait)
                wait = min(self.wait_max_s, wait * 1.5)
            elif outcome is _WAIT_SLOT and not await self._wakeup.wait(wait):
                wait = min(self.wait_max_s, wait * 1.5)

    async def _step(
        self, row: InputRow, request: EditRequest, claim: ClaimRequest, state: _RowRun
    ) -> RowOutcome | _Again:
        """One claim and what it allows: the row's outcome, or when to ask again."""
        claiming = asyncio.ensure_future(
            self._write(
                lambda: self.ledger.claim(
                    [claim],
                    holder=self.holder,
                    max_attempts=self.max_attempts,
                    lease_seconds=self.lease_seconds,
                    budget_usd=self.budget_usd,
                    account_concurrency=self.account_concurrency,
                    refused_since=self.started_at,
                )
            )
        )
        try:
            # Shielded: a stop must not lose a claim the ledger is committing right now.
            [decision] = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            await self._withdraw_claim(claiming)
            raise
        state.paid = decision.paid_attempts
        match decision.action:
            case ClaimAction.REUSE:
                assert decision.attempt is not None
                self.counters.reused_completed += 1
                return _from_submission(row, decision.attempt, state.paid)
            case ClaimAction.WAIT | ClaimAction.WAIT_FOR_SLOT:
                if state.waits == 0 and decision.action is ClaimAction.WAIT:
                    self.counters.waited_for_claim += 1
                if decision.action is ClaimAction.WAIT_FOR_SLOT:
                    await self._adopt_orphans()
                state.waits += 1
                return _WAIT if decision.action is ClaimAction.WAIT else _WAIT_SLOT
            case ClaimAction.EXHAUSTED:
                return self._final(row, state, self._exhausted(decision, state))
            case ClaimAction.ACCOUNT_REFUSED:
                # Another run sharing the ledger found the account refused while this one ran.
                self.account_stop.refuse(decision.last_error or "the account was refused")
                self.counters.account_refused += 1
                return self._final(row, state, self.account_stop.not_sent_error())
            case ClaimAction.OVER_BUDGET:
                self.counters.over_budget += 1
                spent = decision.spent_usd or 0.0
                error = (
                    f"not submitted: FLUX2_BUDGET_USD={self.budget_usd:g} would be exceeded "
                    f"({spent:.4f} USD spent or reserved, this job "
                    f"{claim.price_usd or 0.0:.4f} USD); raise the budget and re-run"
                )
                return self._final(row, state, error)
            case ClaimAction.FOLLOW:
                assert decision.attempt is not None
                self.counters.polled_known += 1
                outcome, again = await self._follow(row, decision.attempt, state)
            case ClaimAction.SUBMIT:
                assert decision.attempt is not None
                if decision.took_over or state.may_be_duplicate:
                    self.counters.unknown_resubmitted += 1
                    state.may_be_duplicate = False
                state.tries += 1
                outcome, again = await self._submit_and_follow(
                    row, request, decision.attempt, state
                )
        if self.account_concurrency is not None:
            self._wakeup.freed()  # the job it held has ended and is recorded
        if again and state.tries < self.attempts_per_run:
            state.last = outcome
            return _NOW
        if outcome.status == FAILED and not again and _is_final(outcome):
            self.counters.final_failures += 1
        return outcome

    async def _adopt_orphans(self) -> None:
        """While rows wait for an account slot, take over the jobs of runs that died.

        A dead run's submitted jobs keep their slots until someone records their end (the
        API still runs them); polled here to their end and recorded, they free their
        slots, and their rows' re-runs find them done instead of paying again.
        """
        now = asyncio.get_running_loop().time()
        if now < self._next_adoption:
            return
        self._next_adoption = now + ADOPT_EVERY_S
        try:
            adopted = await self._write(
                lambda: self.ledger.adopt_orphaned_jobs(self.holder, self.lease_seconds)
            )
        except Exception as exc:  # the next wait tries again
            logger.warning("could not look for jobs of runs that died: %s", exc)
            return
        for job in adopted:
            self.counters.adopted_orphans += 1
            task = asyncio.ensure_future(self._finish_orphan(job))
            self._orphans.add(task)
            task.add_done_callback(self._orphans.discard)

    async def _finish_orphan(self, job: Submission) -> None:
        assert job.request_id is not None
        try:
            result = await self.client.wait(job.request_id, submitted_at=job.submitted_at)
        except asyncio.CancelledError:
            await self._settle_after_cancel(job)
            raise
        except RunComfyError as exc:
            # Left `submitted`: its lease lapses and a later run follows it again.
            logger.info("an adopted job %s: %s", job.request_id, redact_text(str(exc)))
            return
        await self._record_end(job, result)
        if self.account_concurrency is not None:
            self._wakeup.freed()

    async def _withdraw_claim(self, claiming: asyncio.Future[list[ClaimDecision]]) -> None:
        """The run stopped while claiming: an intent it got was never sent, so release it.

        Left as an intent, it would hold the row for the claim's lease and then count as
        an unknown outcome (a possible duplicate) though no request ever left.
        """
        try:
            [decision] = await claiming
        except (Exception, asyncio.CancelledError):
            return  # no claim was committed, or the loop is going away
        if decision.action is ClaimAction.SUBMIT and decision.attempt is not None:
            self._release_unsent(decision.attempt)

    async def _cancel_new_job(self, recording: asyncio.Future[Submission]) -> None:
        """The run stopped while a new job's request id was being recorded.

        The record still commits; then the job is treated as a followed one would be on a
        stop: cancelled through the API if still queued, recorded `cancelled` if it was.
        """
        with contextlib.suppress(Exception, asyncio.CancelledError):
            known = await recording
            assert known.request_id is not None
            with contextlib.suppress(RunComfyError):
                await self.client.cancel(known.request_id)
            await self._settle_after_cancel(known)

    async def _not_sent_account_refused(
        self, row: InputRow, intent: Submission, state: _RowRun
    ) -> RowOutcome:
        error = self.account_stop.not_sent_error()
        await self._write(lambda: self.ledger.record_rejected(intent.id, error))
        self.counters.account_refused += 1
        return RowOutcome(row, FAILED, attempts=state.paid, error=error)

    def _release_unsent(self, intent: Submission) -> None:
        with contextlib.suppress(Exception):
            self.ledger.record_rejected(intent.id, NOT_SENT_STOPPED)

    def _exhausted(self, decision: ClaimDecision, state: _RowRun) -> str:
        cause = state.last.error if state.last is not None else decision.last_error
        cap = f"the row used {state.paid} of {self.max_attempts} paid attempts"
        return f"{cause} (not submitted again: {cap})" if cause else f"not submitted: {cap}"

    def _final(self, row: InputRow, state: _RowRun, error: str) -> RowOutcome:
        self.counters.final_failures += 1
        last = state.last
        return RowOutcome(
            row,
            FAILED,
            request_id=last.request_id if last else None,
            error=error,
            attempts=state.paid,
            submitted_at=last.submitted_at if last else None,
            finished_at=last.finished_at if last else None,
        )

    def _price(self, request: EditRequest) -> float | None:
        if self.price_per_image_usd is None:
            return None
        return self.price_per_image_usd * request.num_images

    async def _submit_and_follow(
        self, row: InputRow, request: EditRequest, intent: Submission, state: _RowRun
    ) -> tuple[RowOutcome, bool]:
        """One paid attempt on a claimed row; returns the outcome and whether to retry."""
        if self.preflight is not None:
            try:
                problem = await self.preflight.check(request.image_urls)
            except asyncio.CancelledError:
                self._release_unsent(intent)
                raise
            if problem is not None:
                problem = redact_text(problem)
                await self._write(
                    lambda: self.ledger.record_rejected(intent.id, f"not sent: {problem}")
                )
                self.counters.not_submitted_references += 1
                error = f"not submitted: {problem}"
                return RowOutcome(row, FAILED, attempts=state.paid, error=error), False
        if self.account_stop.refused:
            return await self._not_sent_account_refused(row, intent, state), False
        # Taken as the request leaves: the job cannot have started, nor ended, before it.
        submitted_at = datetime.now(UTC)
        try:
            handle = await self.client.submit(request)
        except SubmissionOutcomeUnknown as exc:
            why = redact_text(str(exc))
            await self._write(lambda: self.ledger.record_unknown(intent.id, why))
            self.counters.outcome_unknown += 1
            state.paid += 1
            why = redact_text(str(exc))
            error = f"{why}; a re-run will submit it again and count a possible duplicate"
            return RowOutcome(row, FAILED, attempts=state.paid, error=error), False
        except APIError as exc:
            # The client raises an APIError on a submit only for answers that prove no job.
            why = redact_text(str(exc))
            await self._write(lambda: self.ledger.record_rejected(intent.id, why))
            if not is_account_refusal(exc):
                refused = RowOutcome(
                    row, FAILED, attempts=state.paid, error=f"submit refused: {why}"
                )
                return refused, False
            reason = _account_reason(exc)
            self.account_stop.refuse(reason)
            # Every run sharing the ledger learns it, instead of spending its own refusals.
            await self._write(lambda: self.ledger.record_account_refusal(reason))
            self.counters.account_refused += 1
            error = self.account_stop.not_sent_error()
            return RowOutcome(row, FAILED, attempts=state.paid, error=error), False
        except RunComfyError as exc:
            # The client raises anything but SubmissionOutcomeUnknown only for answers that
            # prove no job was created (see runcomfy.errors).
            why = redact_text(str(exc))
            await self._write(lambda: self.ledger.record_rejected(intent.id, why))
            refused = RowOutcome(
                row, FAILED, attempts=state.paid, error=f"submit refused: {redact_text(str(exc))}"
            )
            return refused, False
        except asyncio.CancelledError:
            self.ledger.record_unknown(intent.id, "the run stopped while the submit was in flight")
            raise
        request_id = handle.request_id
        # The job exists and is paid for: its request id must never be dropped. The write
        # is tried until it commits (`keep`) while the job is polled, so a locked or full
        # ledger only delays the row; every later write of the row queues behind it.
        recording = asyncio.ensure_future(
            self._write(
                lambda: self.ledger.record_submitted(intent.id, request_id, submitted_at),
                keep=True,
            )
        )
        known = dataclasses.replace(
            intent,
            state=SubmissionState.SUBMITTED,
            request_id=request_id,
            submitted_at=submitted_at,
        )
        self.counters.submitted += 1
        state.paid += 1
        try:
            outcome, again = await self._follow(row, known, state)
            await asyncio.shield(recording)  # the row ends once its request id is durable
        except asyncio.CancelledError:
            await self._keep_request_id(row, recording, known)
            raise
        if outcome.cost_usd is not None:
            self.counters.new_cost_usd += outcome.cost_usd
        return outcome, again

    async def _follow(
        self, row: InputRow, known: Submission, state: _RowRun
    ) -> tuple[RowOutcome, bool]:
        """Poll a known job to its end; True when it surely ended without a result.

        A job the API lost (ours or one we follow for another run) marks the row's next
        submit as a possible duplicate, to be counted.
        """
        paid = state.paid
        request_id = known.request_id
        assert request_id is not None
        try:
            result = await self.client.wait(request_id, submitted_at=known.submitted_at)
        except asyncio.CancelledError:
            await self._settle_after_cancel(known)
            raise
        except JobDeadlineExceeded as exc:
            if await self._settle_after_cancel(known) is JobState.CANCELLED:
                return _pending(row, known, paid, CANCELLED, redact_text(str(exc))), True
            return _pending(row, known, paid, FAILED, redact_text(str(exc)), live=True), False
        except NotFoundError as exc:
            # The client has already retried the 404 for its grace period and asked for the
            # result: the job is gone. A new submit may duplicate it, and is counted.
            error = f"the API no longer knows this job: {redact_text(str(exc))}"
            await self._write(
                lambda: self.ledger.record_finished(known.id, SubmissionState.FAILED, error=error)
            )
            state.may_be_duplicate = True
            return _pending(row, known, paid, FAILED, error), True
        except RunComfyError as exc:
            # The job may still complete: leave it `submitted` so a re-run polls it.
            lost = _pending(
                row,
                known,
                paid,
                FAILED,
                f"lost track of the job: {redact_text(str(exc))}",
                live=True,
            )
            return lost, False
        outcome = await self._record_result(row, known, paid, result)
        retry = outcome.status != COMPLETED and not failure_blames_input(outcome.error)
        return outcome, retry

    async def _record_result(
        self, row: InputRow, known: Submission, paid: int, result: EditResult
    ) -> RowOutcome:
        status, error, finished_at = await self._record_end(known, result)
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

    async def _record_end(
        self, known: Submission, result: EditResult
    ) -> tuple[RowStatus, str | None, datetime]:
        """Record a job's end in the ledger; the row's status, error and end time."""
        if result.ok:
            state, status = SubmissionState.COMPLETED, COMPLETED
        elif result.state is JobState.CANCELLED:
            state, status = SubmissionState.CANCELLED, CANCELLED
        else:
            state, status = SubmissionState.FAILED, FAILED
        error = None if result.ok else result.error or f"the job ended {result.state.value}"
        # API answers may quote a pre-signed reference URL: never store its signature.
        error = None if error is None else redact_text(error)
        finished_at = result.finished_at or datetime.now(UTC)
        urls = result.output_urls if result.ok else ()
        # Kept like the request id: a paid result is recorded however long the ledger
        # fails (until then a re-run would poll the job again, never pay for it again).
        await self._write(
            lambda: self.ledger.record_finished(
                known.id,
                state,
                finished_at=finished_at,
                error=error,
                cost_usd=result.cost_usd,
                output_urls=urls,
            ),
            keep=True,
        )
        return status, error, finished_at

    async def _keep_request_id(
        self, row: InputRow, recording: asyncio.Future[Submission], known: Submission
    ) -> None:
        """The run stopped while its job's request id was not yet durable.

        The write gets `stop_write_grace_s` more to commit (then the job, cancelled by the
        stop if still queued, is recorded so). If the ledger still fails, the request id
        goes to the ledger's spill file, which the next `Ledger.open` records (a locked
        SQLite ledger), and always to the log, the one record that needs no disk of ours.
        """
        if not recording.done():
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(self.stop_write_grace_s):
                    await self._cancel_new_job(asyncio.shield(recording))
        if recording.done() and not recording.cancelled() and recording.exception() is None:
            return
        # The write goes on while the loop lives; its later failure has nobody to tell.
        recording.add_done_callback(lambda done: done.cancelled() or done.exception())
        assert known.request_id is not None and known.submitted_at is not None
        spilled = self.ledger.spill_submitted(known.id, known.request_id, known.submitted_at)
        logger.error(
            "the ledger could not record request id %s of row %r (partition %r) before the "
            "run stopped; %s",
            known.request_id,
            row.row_id,
            self.partition,
            f"kept in {self.ledger.spill_path}: the next run records it and polls that job"
            if spilled
            else "the job may run and be paid, and a re-run will count that row as a "
            "possible duplicate",
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
            with contextlib.suppress(Exception):
                self.ledger.record_finished(
                    known.id, SubmissionState.CANCELLED, error="cancelled: the run stopped waiting"
                )
        return status.state


async def _first_done(pending: deque[asyncio.Task[RowOutcome]]) -> RowOutcome:
    """Wait for the oldest row's outcome and take it off `pending`.

    Unlike awaiting the task, a stop (cancelling the caller) leaves the row alone here:
    `run` then cancels every pending row at once, so no row waiting for a free slot gets
    the slot of the oldest one as it winds down, and starts a new job after the stop.
    """
    await asyncio.wait([pending[0]])
    return pending.popleft().result()


class _Again(Enum):
    NOW = "now"
    WAIT = "wait"
    WAIT_SLOT = "wait_slot"


_NOW, _WAIT, _WAIT_SLOT = _Again.NOW, _Again.WAIT, _Again.WAIT_SLOT


def _is_final(outcome: RowOutcome) -> bool:
    """A failure that another try cannot fix: the input is at fault, or it was never sent."""
    error = outcome.error or ""
    return failure_blames_input(error) or error.startswith("not submitted")


def _account_reason(error: APIError) -> str:
    """What every row kept from the API by an account refusal says, with the service's words."""
    action = (
        error.action
        if isinstance(error, AccountRefusedError)
        else (f"account refused (HTTP {error.status_code}): check the token and the account")
    )
    said = redact_text(error.message)[:200]
    return f"{action} (the service said: {said})" if said and said != "no message" else action


def _fingerprint(row: InputRow, request: EditRequest) -> str:
    # The row as written: signed URLs change on every run, the job they ask for does not.
    return row.fingerprint or request.fingerprint()


def _pending(
    row: InputRow,
    known: Submission,
    paid: int,
    status: RowStatus,
    error: str,
    *,
    live: bool = False,
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
