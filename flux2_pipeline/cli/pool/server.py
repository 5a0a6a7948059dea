"""The worker server the pool's workers fork from, and the gate they start through.

Its imports take as long as the command's own, so `start_early` starts it before the
command imports anything heavy and the two import side by side. Standard library only.

Example::

    start_early(partitions=[], parallel=None)      # first thing in the command
    context = start_worker_server()                 # when the runs are planned
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flux2_pipeline.run_limits import (
    DEFAULT_PARALLEL_PARTITIONS,
    DEFAULT_PARTITIONS_PER_RUN,
    PARALLEL_PARTITIONS_VARIABLE,
    PARTITIONS_PER_RUN_VARIABLE,
)

logger = logging.getLogger(__name__)

MODULES = (
    "flux2_pipeline.cli.pool.worker",
    # A worker opens the instance, writes Parquet and fetches images: without these here,
    # each would import them after its fork, 0.25 s of CPU apiece. A name this Dagster
    # does not have is skipped.
    "dagster._core.storage.sqlite_storage",
    "dagster_postgres",
    "pandas",
    "httpcore",
    "anyio",
    "anyio._backends._asyncio",
)
"""What the server imports before it forks any worker (through `preload`)."""

PRELOAD = ("flux2_pipeline.cli.pool.preload",)
"""The server's preload list: `preload` imports `MODULES` its own way."""


def start_worker_server() -> multiprocessing.context.ForkServerContext:
    """Start the server once per process, with `PRELOAD` imported; return its context."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    multiprocessing.forkserver.ensure_running()
    return context


def server_alive() -> bool:
    """Whether the worker server of this process runs (`waitid` with WNOWAIT sees its death
    without reaping it, so multiprocessing can still start a new one later).

    >>> server_alive() in (True, False)
    True
    """
    server: Any = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return False
    try:
        if not hasattr(os, "waitid"):  # macOS: a zombie would count as alive
            os.kill(pid, 0)
            return True
        state = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, ProcessLookupError):  # reaped by someone else: gone as well
        return False
    return state is None


def likely_needed(
    partitions: Sequence[str], parallel: int | None, environ: Mapping[str, str]
) -> bool:
    """Whether a `materialize` command with these arguments will probably run several runs at once
    (a guess before the settings are read: a wrong one costs time, never an error).

    >>> likely_needed(["a", "b"], None, {PARTITIONS_PER_RUN_VARIABLE: "1"})
    True
    >>> likely_needed([], 1, {"FLUX2_INPUT_DIR": "/nowhere"})
    False
    """
    given = environ.get(PARALLEL_PARTITIONS_VARIABLE)
    workers = parallel if parallel is not None else _whole(given)
    if (workers or DEFAULT_PARALLEL_PARTITIONS) < 2:
        return False
    per_run = _whole(environ.get(PARTITIONS_PER_RUN_VARIABLE)) or DEFAULT_PARTITIONS_PER_RUN
    files = len(partitions)
    if not files:
        folder = environ.get("FLUX2_INPUT_DIR")
        if not folder or not os.path.isdir(folder):
            return False
        files = sum(1 for _ in Path(folder).glob("*.parquet"))
    return files > per_run


def start_early(
    partitions: Sequence[str], parallel: int | None, environ: Mapping[str, str] | None = None
) -> None:
    """Start the worker server now if `likely_needed`; quietly do nothing if it cannot."""
    if likely_needed(partitions, parallel, os.environ if environ is None else environ):
        # On failure `server_or_one` tries again when the runs need it, and says why.
        with contextlib.suppress(OSError):
            start_worker_server()


def _whole(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None  # Settings will name the variable


def server_or_one(workers: int) -> int:
    """`workers` once the worker server runs; 1 (with a warning) if it cannot start."""
    try:
        start_worker_server()
    except OSError as exc:  # e.g. the server was killed and reaped by someone else
        logger.warning(f"no worker processes ({exc}); runs go one after another")
        return 1
    return workers


def exit_now(code: int = 0) -> None:
    """Flush what this process may have printed, then end it without any teardown.

    The server and its workers have nothing to tear down (a run's writes are committed),
    and walking Dagster's objects at exit held whoever waited for them for nothing.
    """
    for stream in (sys.stdout, sys.stderr):
        # A stream closed or replaced has nothing left to keep.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(code)


START_GATE_TIMEOUT_S = 30.0
"""Longest a run waits at the gate: past it, it starts anyway (the gate only orders work)."""


class StartGate:
    """Lets at most `width` runs of one command start at once (one per core by default).

    Starting a run is CPU work (0.5 s for a range of 25 partitions): runs starting together
    on few cores all start late, and no job leaves before the last has started. A run
    passes the gate when its step starts (`release`) or it ends; one that waits past
    `START_GATE_TIMEOUT_S` goes ahead anyway, so a worker that died holding the gate slows
    the others, never stops them.

    Example::

        gate = StartGate(start_worker_server())
        with gate.held() as passed:       # in a worker, around one run
            ...                           # passed() once the run's step has started
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
