"""Group commit: the ledger writes of many concurrent rows in one transaction.

Every row's task hands its write (a claim, a request id, an outcome) to `GroupCommit`
and waits. Once per turn of the event loop, everything handed in so far is written in
one `Ledger.transaction` and committed (one fsync on SQLite instead of one per write);
only then does each task get its answer. So an intent is durable before its request
leaves, a request id before the job is polled, exactly as with one commit per write,
at a fraction of the cost when many jobs are in flight.

Example::

    writes = GroupCommit(ledger)
    [decision] = await writes(lambda: ledger.claim([claim], holder=h, max_attempts=9))
    await writes(lambda: ledger.record_submitted(decision.attempt.id, request_id))
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from flux2_pipeline.ledger import Ledger, LedgerConflictError, LedgerStateError

T = TypeVar("T")

CONFLICT_RETRIES = 8
"""Times a batch is run again after the database broke a deadlock by rolling it back."""


class GroupCommit:
    """Runs ledger writes handed in during one loop turn as one committed transaction."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._queue: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self.conflicts = 0
        """Batches the database rolled back to break a deadlock, and that were run again."""
        self.transactions = 0
        """How many transactions were committed (for benchmarks and tests)."""
        self.writes = 0

    async def __call__(self, write: Callable[[], T]) -> T:
        """Queue `write` (a call on the ledger) and return its result once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((write, future))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        for attempt in range(1, CONFLICT_RETRIES + 1):
            answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            try:
                with self._ledger.transaction():
                    for write, future in batch:
                        try:
                            answers.append((future, write(), None))
                        except LedgerStateError as refused:  # wrote nothing; the rest stand
                            answers.append((future, None, refused))
            except LedgerConflictError as failed:
                # Two runners' batches touched the same rows in different orders and the
                # database rolled this one back: nothing was written, so run it again.
                if attempt < CONFLICT_RETRIES:
                    self.conflicts += 1
                    continue
                self._fail(batch, failed)
                return
            except Exception as failed:  # nothing of this batch is durable
                self._fail(batch, failed)
                return
            break
        self.transactions += 1
        self.writes += len(batch)
        for future, result, error in answers:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]], error: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
