"""`wait_until`: the one way a test polls for a state it cannot be told about.

The deadline only stops a hang; the interval is a polling period, not a wait for an event.
An async test hands it to a thread so its event loop keeps running meanwhile.

Example:
    >>> wait_until(lambda: counters.jobs_created >= 12, "12 jobs created", timeout=120)
    >>> await asyncio.to_thread(wait_until, lambda: state.in_progress == 2, "2 running")
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool],
    what: str = "the condition",
    *,
    timeout: float = 60.0,
    interval: float = 0.02,
) -> None:
    """Poll `condition` until it holds; fail the test if it does not within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout} s")
        time.sleep(interval)
