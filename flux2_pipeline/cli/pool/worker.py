"""A worker process's life (one run, its summaries sent back, exit) and its pipe to the
command (`Channel`: the outcome one way, `STOP` the other, end-of-file when the command dies).

Example::

    mine, theirs = context.Pipe()        # the command keeps `mine`, the worker gets `theirs`
    context.Process(target=worker_main, args=(setup, theirs, keys, run_id, assets, {})).start()
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from dagster import AssetKey, DagsterEventType, DagsterInstance, EventLogEntry, JobDefinition

from flux2_pipeline.cli.pool.server import StartGate, exit_now
from flux2_pipeline.cli.report import PartitionSummary, one_line
from flux2_pipeline.cli.runs import run_partitions
from flux2_pipeline.settings import Settings

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

    On the command's death (end-of-file on `channel`) the worker has `grace` seconds to
    stop its run cleanly, then `exit_process(1)` ends it.

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


Outcome = tuple[list[PartitionSummary] | None, str | None]
"""What a worker sends: its summaries (None: stopped before it started) or an error."""


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process needs besides its run: the command's settings and state."""

    settings: Settings
    instance_ref: Any  # `DagsterInstance.get_ref()`'s value; Dagster exports no name for it
    environ: dict[str, str]
    warning_filters: list[Any]
    gate: StartGate


@dataclass(frozen=True)
class _Worker:
    job: JobDefinition
    instance: DagsterInstance
    stopping: threading.Event
    gate: StartGate


def worker_main(
    setup: WorkerSetup,
    channel: Channel,
    keys: list[str],
    run_id: str,
    assets: list[AssetKey],
    run_config: dict[str, Any],
) -> None:
    """A worker process's life: one run, its summaries sent to the command, then exit."""
    outcome: Outcome
    try:
        worker = _start(setup, channel)
        outcome = (_run(worker, keys, run_id, assets, run_config), None)
    except BaseException as exc:  # the command fails this run alone
        outcome = (None, one_line(type(exc).__name__, str(exc)))
    with contextlib.suppress(OSError):
        channel.send(outcome)
    exit_now()


def _start(setup: WorkerSetup, channel: Channel) -> _Worker:
    # The server the workers fork from started with the environment of its time, and
    # without the warning filters the command set up (Dagster's beta notices stay quiet).
    os.environ.clear()
    os.environ.update(setup.environ)
    for action, message, category, module, line in reversed(setup.warning_filters):
        warnings.filterwarnings(action, _pattern(message), category, _pattern(module), line)
    # Ctrl+C at the terminal reaches the command alone; it stops the workers through their
    # pipes, so a run is never interrupted twice (a second interrupt would cut its cleanup
    # short).
    os.setpgrp()
    stopping = threading.Event()

    def note_stop(_signal: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, note_stop)
    signal.signal(signal.SIGTERM, note_stop)

    def relay() -> None:
        stopping.set()
        # Dagster's handler stops a run in progress; before the run has installed it, the
        # interrupt would only reach `note_stop`, and a run that checked `stopping` just
        # before would go on paying. So wait for Dagster's handler, or for the end.
        while signal.getsignal(signal.SIGINT) is note_stop:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    watch_command(channel, on_stop=lambda: threading.Thread(target=relay, daemon=True).start())
    job = setup.settings.definitions().resolve_implicit_global_asset_job_def()
    instance = DagsterInstance.from_ref(setup.instance_ref)
    return _Worker(job, instance, stopping, setup.gate)


def _pattern(text: re.Pattern[str] | str | None) -> str:
    """A warning filter's message or module as the text `filterwarnings` takes."""
    if isinstance(text, re.Pattern):
        return text.pattern
    return text or ""


def _run(
    worker: _Worker,
    keys: list[str],
    run_id: str,
    assets: list[AssetKey],
    run_config: dict[str, Any],
) -> list[PartitionSummary] | None:
    with worker.gate.held(cancel=worker.stopping) as passed:
        if worker.stopping.is_set():
            # Stopped before it started or while it waited at the gate (a stop ends that
            # wait at once): never started.
            return None
        worker.instance.add_event_listener(run_id, _on_step_start(passed))
        return run_partitions(
            worker.job, worker.instance, keys, assets, run_config=run_config, run_id=run_id
        )


def _on_step_start(call: Callable[[], None]) -> Callable[[EventLogEntry], None]:
    """An event listener that calls `call` when the run's step starts."""

    def listen(event: EventLogEntry) -> None:
        if event.dagster_event_type == DagsterEventType.STEP_START:
            call()

    return listen
