"""The start gate: at most one run per core of one command starts at a time."""

from __future__ import annotations

import contextlib
import multiprocessing.context
import os
import threading
import time
from collections.abc import Callable, Iterator

START_GATE_TIMEOUT_S = 30.0
"""Longest a run waits at the gate: past it, it starts anyway (the gate only orders work)."""


class StartGate:
    """Lets at most `width` runs of one command start at once (one per core by default).

    Starting a Dagster run is CPU work: creating the run writes one planned event per
    partition and per check, then the run's start, resource and step events, each a
    commit of its own (0.5 s of CPU for a range of 25 partitions). Four workers starting
    together on two cores each took twice as long, and no job left before all four had
    started. Through the gate the first runs start at full speed and send their jobs while
    the others start. A run passes the gate when its step starts (`release`), or when it
    ends early; a run that waits more than `START_GATE_TIMEOUT_S` goes ahead anyway, so a
    worker that died holding the gate slows the others, never stops them.

    The gate is a semaphore of the worker server's context, made by the command and given
    to each worker at its start.

    Example::

        gate = StartGate(start_worker_server())
        with gate.held() as passed:       # in a worker, around one run
            instance.add_event_listener(run_id, lambda event: step_started(event) and passed())
            job.execute_in_process(instance=instance, run_id=run_id)
    """

    def __init__(
        self, context: multiprocessing.context.BaseContext, width: int | None = None
    ) -> None:
        self.width = max(1, width or os.cpu_count() or 1)
        self._slots = context.BoundedSemaphore(self.width)

    @contextlib.contextmanager
    def held(
        self, timeout: float = START_GATE_TIMEOUT_S, cancel: threading.Event | None = None
    ) -> Iterator[Callable[[], None]]:
        """Wait for a place, hold it until the callable given is called or the block ends.

        The wait ends early, without a place, once `cancel` is set (the command stopping).
        """
        deadline = time.monotonic() + timeout
        acquired = self._slots.acquire(timeout=0)
        while not acquired and not (cancel is not None and cancel.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            acquired = self._slots.acquire(timeout=min(left, 0.1))
        released = threading.Lock()
        done = [not acquired]

        def release() -> None:
            with released:
                if done[0]:
                    return
                done[0] = True
            self._slots.release()

        try:
            yield release
        finally:
            release()
