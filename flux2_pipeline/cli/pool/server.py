"""The worker server: the process the pool's workers fork from, started early when needed.

The server needs as long for its imports as the command does for its own (0.8 s here).
Started after them, it made every backfill wait for it. `start_early` starts it before
the command imports anything heavy, whenever the command is likely to need it, so the
two import side by side on two cores. It imports more than the command, too (`MODULES`:
what each worker would otherwise import after its fork). Standard library only.

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
from collections.abc import Mapping, Sequence
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
    """Whether the worker server of this process runs (a dead one is left unreaped).

    The server is this process's child: `waitid` with WNOWAIT sees its death without
    reaping it, so multiprocessing can still start a new one later.

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
    """Whether a `materialize` command with these arguments will probably run several runs at once.

    A guess from the arguments and the raw environment, made before the settings are
    read: a wrong one costs a server that idles, or one started later, never an error.

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
