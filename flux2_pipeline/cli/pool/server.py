"""The server that `flux2-pipeline materialize`'s worker processes fork from.

When a command runs several Dagster runs at once, each goes to a worker process. The
workers fork from one server (multiprocessing's forkserver) that imported what a run
needs once, so a worker starts in milliseconds instead of importing Dagster again, and
forks from a process with no threads, which forking the command itself would not be.

Each Dagster run gets a worker process of its own, which ends with its run; the command
starts the next run's worker when one ends, so a worker that dies (killed, out of memory)
fails only its own run. The command and each worker share one pipe (`Channel`): the
worker sends its run's summaries back on it, the command sends `STOP` on it to stop the
run. The pipe is also how a worker learns that the command has died, whatever killed it
(SIGKILL, the OOM killer, a CI timeout): the kernel closes the command's end, and the
worker's `watch_command` thread reads end-of-file. The worker then stops its run as a
stop from the command would (queued jobs cancelled, running ones kept in the ledger) and
ends within `ORPHAN_GRACE_S` at the latest, so an orphan never keeps paying and never
starts another run (only the command starts runs).

Why a pipe and not Linux's PR_SET_PDEATHSIG: the death signal fires on the death of the
parent *thread* that forked the child, and a worker's parent is the worker server, not
the command; the server would have to watch the command and the workers the server, and
a server killed on its own would take every worker with it without a clean stop. It is
Linux-only, too. End-of-file on a pipe whose write end only the command holds (the
server gets the worker's end for the fork alone, and closes its copy) needs neither.

The server needs as long for its imports as the command does for its own (0.8 s here).
Started after them, it made every backfill wait for it. `start_early` starts it before
the command imports anything heavy, whenever the command is likely to need it, so the
two import side by side on two cores. It imports more than the command, too: what a
worker would otherwise import after its fork, each worker for itself (the instance's
storages, pandas for pyarrow, httpx's connection pool), through `worker_server`, which
also ends the server at once when the command exits. `StartGate` lets at most one run per
core start at a time, so the first runs reach the API sooner.

This module imports nothing but the standard library: it runs before Dagster is loaded.

Example::

    start_early(partitions=[], parallel=None)      # first thing in the command
    ...
    context = start_worker_server()                 # when the runs are planned
    mine, theirs = context.Pipe()
    context.Process(target=run_one, args=(theirs,)).start()   # run_one: watch_command(theirs, ...)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.forkserver
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

MODULES = (
    "flux2_pipeline.materialize",
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
"""What the server imports before it forks any worker (through `worker_server`)."""

PRELOAD = ("flux2_pipeline.worker_server",)
"""The server's preload list: `worker_server` imports `MODULES` its own way."""

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


Channel = multiprocessing.connection.Connection
"""One end of the pipe between the command and one worker (`multiprocessing.Pipe()`)."""

STOP = b"stop"
"""What the command sends a worker to stop its run (end-of-file means the command died)."""

ORPHAN_GRACE_S = 10.0
"""How long a worker whose command died has to stop its run cleanly before it exits anyway."""


def tell_stop(channel: Channel) -> None:
    """Ask the worker at the other end of `channel` to stop its run (if it still runs)."""
    with contextlib.suppress(OSError):
        channel.send_bytes(STOP)


def watch_command(
    channel: Channel,
    on_stop: Callable[[], None],
    grace: float = ORPHAN_GRACE_S,
    exit_process: Callable[[int], None] = os._exit,
) -> threading.Thread:
    """In a worker: call `on_stop` when the command says `STOP` or dies; return the thread.

    The thread blocks on the worker's end of `channel`. `STOP` is a stop the command
    waits for. End-of-file is the command's death (the kernel closed its end): after
    `on_stop`, the worker has `grace` seconds to stop its run cleanly, then
    `exit_process(1)` ends it, so no worker outlives its command by more.

    Example::

        watch_command(channel, on_stop=lambda: os.kill(os.getpid(), signal.SIGINT))
    """

    def watch() -> None:
        try:
            channel.recv_bytes()
        except (EOFError, OSError):
            on_stop()
            time.sleep(grace)
            exit_process(1)
        else:
            on_stop()

    thread = threading.Thread(target=watch, name="flux2-command-watch", daemon=True)
    thread.start()
    return thread


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
