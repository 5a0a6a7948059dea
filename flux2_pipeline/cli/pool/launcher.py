"""Runs ranges of partitions in worker processes, a few at once, in order (the design is
in docs/architecture.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait as connection_wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from dagster import AssetKey, DagsterEventType, DagsterInstance

from flux2_pipeline.cli.pool.server import StartGate, server_alive, start_worker_server
from flux2_pipeline.cli.pool.worker import Channel, Outcome, WorkerSetup, tell_stop, worker_main
from flux2_pipeline.cli.report import PartitionSummary, materialized_figures
from flux2_pipeline.cli.runs import PROGRESS_POLL_SECONDS, ProgressWatcher
from flux2_pipeline.ledger import Ledger
from flux2_pipeline.settings import Settings

logger = logging.getLogger(__name__)


def run_in_workers(
    settings: Settings,
    instance: DagsterInstance,
    runs: Sequence[Sequence[str]],
    assets: Sequence[AssetKey],
    run_config: Mapping[str, Any],
    watcher: ProgressWatcher | None,
    workers: int,
) -> list[PartitionSummary]:
    """Up to `workers` runs at once, in order, each in a worker process of its own.

    A worker that dies fails its own run's partitions alone (reported from what the
    instance and the ledger hold). A stop (Ctrl+C, SIGTERM) stops each running run and
    starts no other; runs not yet started are left out of the report. A worker server
    that dies stops the runs the same way, and reports those it never started. Returns
    once every worker has ended.
    """
    context = start_worker_server()
    setup = WorkerSetup(
        settings, instance.get_ref(), dict(os.environ), list(warnings.filters), StartGate(context)
    )
    run_ids = [str(uuid.uuid4()) for _ in runs]
    waiting = deque(range(len(runs)))
    running: dict[Channel, _Running] = {}
    results: dict[str, PartitionSummary] = {}
    server_lost = stopping = False

    def start(index: int) -> None:
        mine, theirs = context.Pipe()
        args = (setup, theirs, list(runs[index]), run_ids[index], list(assets), dict(run_config))
        process = context.Process(target=worker_main, args=args, name=f"flux2-run-{index}")
        try:
            process.start()
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # the worker's end lives in the worker alone: its death is our EOF
        running[mine] = _Running(index, process, mine, time.monotonic())

    def keep(entry: _Running) -> None:
        keys = runs[entry.index]
        summaries = _run_outcome(settings, instance, keys, run_ids[entry.index], assets, entry)
        if not summaries and server_lost:  # stopped before it started
            summaries = list(_not_started(keys).values())
        for summary in summaries:
            results[summary.partition] = summary
            if watcher is not None:
                watcher.finished(summary)

    with _stop_requests() as stop:
        try:
            while waiting or running:
                if not (stop.is_set() or server_lost):
                    server_lost = _start_waiting(start, waiting, running, workers)
                if (stop.is_set() or server_lost) and not stopping:
                    stopping = True
                    for entry in running.values():
                        tell_stop(entry.channel)
                if stopping and waiting:
                    if server_lost:
                        for index in waiting:
                            results.update(_not_started(runs[index]))
                    waiting.clear()
                watched: list[Any] = list(running)
                if not server_lost:
                    watched += [entry.process.sentinel for entry in running.values()]
                ready = connection_wait(watched, PROGRESS_POLL_SECONDS) if watched else []
                for channel in [item for item in ready if isinstance(item, Channel)]:
                    entry = running[channel]
                    if _read(entry):
                        del running[channel]
                        keep(entry)
                if not server_lost and (_orphaned(ready, running) or not server_alive()):
                    server_lost = True
                    logger.error(
                        "the worker server died: stopping the running runs, starting no other"
                    )
                if watcher is not None:
                    watcher.follow({run_ids[e.index]: runs[e.index][0] for e in running.values()})
        finally:
            _wait_for_all(running)
    return [results[key] for keys in runs for key in keys if key in results]


def _start_waiting(
    start: Callable[[int], None],
    waiting: deque[int],
    running: Mapping[Channel, _Running],
    workers: int,
) -> bool:
    """Start the next runs while places are free; True when the worker server is gone.

    A dead server is not restarted: a part of the command was killed, and a new run would
    pay for jobs nobody watches over.
    """
    while waiting and len(running) < workers:
        if not server_alive():
            logger.error("the worker server died: starting no other run")
            return True
        try:
            start(waiting[0])
        except (OSError, EOFError) as exc:  # the server died between the check and the fork
            logger.error(f"the worker server cannot start a run ({exc!r}): starting no other")
            return True
        waiting.popleft()
    return False


def _orphaned(ready: Sequence[Any], running: Mapping[Channel, _Running]) -> bool:
    """Whether a worker's exit status came while it still runs: its server has died (that
    makes every sentinel readable; a worker that really ended has closed its pipe first).
    """
    return any(
        entry.process.sentinel in ready and not entry.channel.poll(0) for entry in running.values()
    )


def _wait_for_all(running: dict[Channel, _Running]) -> None:
    """Stop and outwait the workers still running (the command never leaves one behind)."""
    for entry in running.values():
        tell_stop(entry.channel)
    for channel in list(running):
        with contextlib.suppress(EOFError, OSError):
            while True:
                channel.recv()
        channel.close()
        del running[channel]


@dataclass
class _Running:
    """A run's worker process and the command's end of its pipe."""

    index: int
    process: BaseProcess
    channel: Channel
    started: float
    outcome: Outcome | None = None  # None: the worker sent nothing


def _read(entry: _Running) -> bool:
    """Take what the worker sent; True once it has ended (end-of-file on its pipe)."""
    try:
        entry.outcome = entry.channel.recv()
    except (EOFError, OSError):
        entry.channel.close()
        entry.process.join(timeout=1.0)  # its exit status, when the server is still there
        return True
    return False


def _run_outcome(
    settings: Settings,
    instance: DagsterInstance,
    keys: Sequence[str],
    run_id: str,
    assets: Sequence[AssetKey],
    entry: _Running,
) -> list[PartitionSummary]:
    """A run's summaries: the worker's own, or what the instance and ledger say it did."""
    if entry.outcome is None:
        seconds = time.monotonic() - entry.started
        how = _exit_status(entry.process.exitcode)
        death = f"its worker process died ({how}) before the run ended"
        return _dead_run(settings, instance, keys, run_id, assets, death, seconds)
    summaries, error = entry.outcome
    if error is not None:
        failure = f"its worker process failed: {error}"
        return [PartitionSummary(key, False, 0.0, error=failure) for key in keys]
    return summaries or []


def _exit_status(code: int | None) -> str:
    """How a worker process ended, in words ("killed by SIGKILL").

    >>> _exit_status(-9)
    'killed by SIGKILL'
    """
    if code is None or code == 255:  # 255: the server that would know is gone too
        return "exit status unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _dead_run(
    settings: Settings,
    instance: DagsterInstance,
    keys: Sequence[str],
    run_id: str,
    assets: Sequence[AssetKey],
    error: str,
    seconds: float,
) -> list[PartitionSummary]:
    """The partitions of a run whose worker died, from the instance and the ledger.

    A partition materialized for every selected asset succeeded; any other failed, with
    the ledger's completed rows. The run is marked failed, so the UI does not show it running.
    """
    try:
        records = instance.get_records_for_run(
            run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
        ).records
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            instance.report_run_failed(run, message=f"flux2-pipeline materialize: {error}")
    except Exception as exc:  # the instance is not what the worker left: report as failed
        logger.warning(f"cannot read run {run_id} of a dead worker: {exc!r}")
        records = []
    figures, materialized = materialized_figures(
        keys, (record.asset_materialization for record in records)
    )
    completed = _ledger_completed(settings, [k for k in keys if materialized[k] < set(assets)])
    summaries = []
    for key in keys:
        if materialized[key] >= set(assets):
            summaries.append(PartitionSummary.from_metadata(key, figures[key], True, None, seconds))
        else:
            done = completed.get(key, 0)
            summaries.append(
                PartitionSummary(key, False, seconds, rows=done, completed=done, error=error)
            )
    return summaries


def _ledger_completed(settings: Settings, keys: Sequence[str]) -> dict[str, int]:
    """Each partition's completed rows in the ledger (empty when it cannot be read)."""
    if not keys:
        return {}
    try:
        with Ledger.open(settings.ledger.effective_url) as ledger:
            return {key: ledger.stats(key)["completed"] for key in keys}
    except Exception as exc:  # a report without the figures beats no report
        logger.warning(f"cannot read the ledger for a dead worker's partitions: {exc!r}")
        return {}


def _not_started(keys: Sequence[str]) -> dict[str, PartitionSummary]:
    error = "not started: the worker server died"
    return {key: PartitionSummary(key, False, 0.0, error=error, interrupted=True) for key in keys}


@contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """An event set by SIGTERM (what `kill` and orchestrators send) and by Ctrl+C.

    SIGINT is left alone when it is ignored (a command started in the background from a
    script): the shell's choice stands. Off the main thread no handler can be set, and
    the event is never set.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def note(_signal: int, _frame: FrameType | None) -> None:
        stop.set()

    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signals.append(signal.SIGINT)
    previous = {number: signal.signal(number, note) for number in signals}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
