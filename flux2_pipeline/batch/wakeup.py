"""Wakes a row waiting for an account slot as soon as this process frees one.

Rows that find every slot of `FLUX2_ACCOUNT_CONCURRENCY` taken ask the ledger again
later. A slot freed by another process is only seen on that next ask (a backoff up to
`runner.WAIT_MAX_S`); one freed here wakes one waiting row at once, so the account does
not sit idle while the backoff runs out.

Example::

    wakeup = SlotWakeup()
    woken = await wakeup.wait(1.0)   # True if `wakeup.freed()` was called meanwhile
"""

from __future__ import annotations

import asyncio
from collections import deque

PRUNE_AT = 1024
"""Waiters kept before the ones that timed out are dropped (they are skipped anyway)."""


class SlotWakeup:
    """One waiting row woken per freed slot; shared by the runners of one event loop."""

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[None]] = deque()

    def freed(self) -> None:
        """A job of this process ended: wake the row that has waited longest, if any."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait(self, timeout: float) -> bool:
        """Wait until `freed` picks this row or `timeout` seconds pass; True if picked."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._waiting) >= PRUNE_AT:
            self._waiting = deque(w for w in self._waiting if not w.done())
        self._waiting.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        return True

    @property
    def waiting(self) -> int:
        """How many rows wait right now."""
        return sum(1 for waiter in self._waiting if not waiter.done())
