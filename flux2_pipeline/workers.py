"""The server that `flux2-pipeline materialize`'s worker processes fork from.

When a command runs several Dagster runs at once, each goes to a worker process. The
workers fork from one server (multiprocessing's forkserver) that imported what a run
needs once, so a worker starts in milliseconds instead of importing Dagster again, and
forks from a process with no threads, which forking the command itself would not be.

The server needs as long for its imports as the command does for its own (0.8 s here).
Started after them, it made every backfill wait for it. `start_early` starts it before
the command imports anything heavy, whenever the command is likely to need it, so the
two import side by side on two cores. It imports more than the command, too: what a
worker would otherwise import after its fork, each worker for itself (the instance's
storages, pandas for pyarrow, httpx's connection pool).

This module imports nothing but the standard library: it runs before Dagster is loaded.

Example::

    start_early(partitions=[], parallel=None)      # first thing in the command
    ...
    context = start_worker_server()                 # when the runs are planned
    pool = ProcessPoolExecutor(4, mp_context=context)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

PRELOAD = (
    "flux2_pipeline.materialize",
    # A worker opens the instance, writes Parquet and fetches images: without these here,
    # each would import them after its fork, 0.25 s of CPU apiece. A name this Dagster
    # does not have is skipped (the server ignores ImportError).
    "dagster._core.storage.sqlite_storage",
    "dagster_postgres",
    "pandas",
    "httpcore",
    "anyio",
    "anyio._backends._asyncio",
)
"""What the server imports before it forks any worker."""

PARALLEL_VARIABLE = "FLUX2_PARALLEL_PARTITIONS"
PER_RUN_VARIABLE = "FLUX2_PARTITIONS_PER_RUN"
DEFAULT_PARALLEL = 4
"""`Settings.parallel_partitions`' default (a test holds the two equal)."""
DEFAULT_PER_RUN = 25
"""`ranges.DEFAULT_PARTITIONS_PER_RUN` (a test holds the two equal)."""


def start_worker_server() -> multiprocessing.context.ForkServerContext:
    """Start the server once per process, with `PRELOAD` imported; return its context."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    multiprocessing.forkserver.ensure_running()
    return context


def likely_needed(
    partitions: Sequence[str], parallel: int | None, environ: Mapping[str, str]
) -> bool:
    """Whether a `materialize` of these arguments will probably run several runs at once.

    A guess from the arguments and the raw environment, made before the settings are
    read: a wrong one costs a server that idles, or one started later, never an error.

    >>> likely_needed(["a", "b"], None, {PER_RUN_VARIABLE: "1"})
    True
    >>> likely_needed([], 1, {"FLUX2_INPUT_DIR": "/nowhere"})
    False
    """
    workers = parallel if parallel is not None else _whole(environ.get(PARALLEL_VARIABLE))
    if (workers or DEFAULT_PARALLEL) < 2:
        return False
    per_run = _whole(environ.get(PER_RUN_VARIABLE)) or DEFAULT_PER_RUN
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
        # On failure `materialize` tries again when it needs the server, and says why.
        with contextlib.suppress(OSError):
            start_worker_server()


def _whole(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None  # Settings will name the variable
