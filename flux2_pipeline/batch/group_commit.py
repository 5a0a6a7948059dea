"""Group commit: the ledger writes of many concurrent rows in one transaction.

Every row's task hands its write (a claim, a request id, an outcome) to `GroupCommit`
and waits. Everything handed in during one turn of the event loop is written in one
`Ledger.transaction` and committed (one fsync on SQLite instead of one per write); only
then does each task get its answer. So an intent is durable before its request leaves,
exactly as with one commit per write, at a fraction of the cost when many jobs are in
flight.

The transaction runs in a worker thread, one at a time and in the order the writes were
handed in: a ledger that waits for a lock (SQLite's busy timeout, PostgreSQL's lock
timeout) or a slow disk never freezes the event loop, so polls and heartbeats go on.
Writes handed in meanwhile form the next batch.

A batch the database fails (locked past its timeout, disk full, connection lost) is not
thrown away: each of its writes is tried again on its own, with backoff, so one write
that cannot succeed fails alone. A write made with ``keep=True`` (one that carries a
request id the API already gave) is tried until it commits; any other gives up after
`GIVE_UP_SECONDS` of failures and its caller gets the error.

Example::

    writes = GroupCommit(ledger)
    [decision] = await writes(lambda: ledger.claim([claim], holder=h, max_attempts=9))
    await writes(lambda: ledger.record_submitted(decision.attempt.id, request_id), keep=True)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flux2_pipeline.ledger import (
    Ledger,
    LedgerConflictError,
    LedgerStateError,
    LedgerUnavailableError,
)

T = TypeVar("T")

logger = logging.getLogger(__name__)

CONFLICT_RETRIES = 8
"""Times a batch is run again at once after the database broke a deadlock by rolling it back."""

RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 5.0
"""Backoff between tries of a write the database failed: doubling from the first to the max."""

GIVE_UP_SECONDS = 120.0
"""How long a write without ``keep`` is tried before its caller gets the database's error."""


@dataclass(slots=True)
class _Entry:
    write: Callable[[], Any]
    future: asyncio.Future[Any]
    keep: bool


_Answer = tuple[Any, BaseException | None]


class GroupCommit:
    """Runs ledger writes handed in during one loop turn as one committed transaction."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._queue: list[_Entry] = []
        self._drainer: asyncio.Task[None] | None = None
        self.conflicts = 0
        """Batches the database rolled back to break a deadlock, and that were run again."""
        self.transactions = 0
        """How many transactions were committed (for benchmarks and tests)."""
        self.writes = 0
        self.retries = 0
        """Tries of a single write after the database failed it (locked, disk full...)."""

    async def __call__(self, write: Callable[[], T], *, keep: bool = False) -> T:
        """Queue `write` (a call on the ledger) and return its result once committed.

        With `keep`, a failing database never makes the write give up: it is tried until
        it commits (use it for writes that carry a request id the API gave).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append(_Entry(write, future, keep))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            await self._flush(batch)

    async def _flush(self, batch: list[_Entry]) -> None:
        try:
            answers = await asyncio.to_thread(self._commit, batch)
        except Exception as failed:  # nothing of this batch is durable
            if len(batch) == 1:
                await self._write_alone(batch[0], failed)
                return
            logger.warning(
                "the ledger failed a batch of %d writes (%s); trying each on its own",
                len(batch),
                failed,
            )
            for entry in batch:
                await self._write_alone(entry, None)
            return
        self._answer(batch, answers)

    async def _write_alone(self, entry: _Entry, failed: Exception | None) -> None:
        """Try one write until it commits, fails for its own reason, or gives up."""
        delay = RETRY_FIRST_SECONDS
        started = time.monotonic()
        while True:
            if failed is not None:
                if not isinstance(failed, LedgerUnavailableError) or (
                    not entry.keep and time.monotonic() - started >= GIVE_UP_SECONDS
                ):
                    _settle(entry.future, None, failed)
                    return
                if self.retries % 20 == 0:  # a lock held for a minute is a few lines, not 600
                    logger.warning("the ledger failed a write (%s); trying again", failed)
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_SECONDS, delay * 2)
            try:
                answers = await asyncio.to_thread(self._commit, [entry])
            except Exception as again:
                failed = again
                continue
            self._answer([entry], answers)
            return

    def _commit(self, batch: list[_Entry]) -> list[_Answer]:
        """Run the batch in one transaction (in a worker thread); raise if nothing committed."""
        for attempt in range(1, CONFLICT_RETRIES + 1):
            answers: list[_Answer] = []
            try:
                with self._ledger.transaction():
                    for entry in batch:
                        try:
                            answers.append((entry.write(), None))
                        except LedgerStateError as refused:  # wrote nothing; the rest stand
                            answers.append((None, refused))
            except LedgerConflictError:
                # Two runners' batches touched the same rows in different orders and the
                # database rolled this one back: nothing was written, so run it again.
                if attempt < CONFLICT_RETRIES:
                    self.conflicts += 1
                    continue
                raise
            return answers
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, batch: list[_Entry], answers: list[_Answer]) -> None:
        self.transactions += 1
        self.writes += len(batch)
        for entry, (result, error) in zip(batch, answers, strict=True):
            _settle(entry.future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # its caller stopped waiting; the write itself was still made (or tried)
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
