"""Progress of `flux2-pipeline materialize`: a bar on a terminal, plain lines otherwise.

Both show the progress observations the edits step records (rows done, failed, spend),
as `flux2_pipeline.cli.runs.ProgressWatcher` reads them.

Example::

    with progress_view(sys.stdout) as show:
        report = run_backfill(settings, progress=show)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from flux2_pipeline.assets.metadata import EditsProgress
from flux2_pipeline.cli.runs import ProgressCallback

PLAIN_EVERY_SECONDS = 10.0


def progress_text(done: int, total: int, failed: int, cost: float, rate: float) -> str:
    """`120/500 rows, 4.1 rows/s, 3 failed, $2.40`."""
    return f"{done}/{total} rows, {rate:.1f} rows/s, {failed} failed, ${cost:.2f}"


def _figures(metadata: Mapping[str, Any]) -> tuple[int, int, int, float, float]:
    """Rows done, total and failed, the cost, and rows per second."""
    figures = EditsProgress.extract(metadata)
    rate = figures.rows_done / figures.seconds if figures.seconds > 0 else 0.0
    return figures.rows_done, figures.rows_total, figures.rows_failed, figures.cost_usd, rate


@contextmanager
def progress_view(stream: TextIO) -> Iterator[ProgressCallback]:
    """A progress callback: a live bar when `stream` is a terminal, else a line per 10 s."""
    if not stream.isatty():
        last: dict[str, float] = {}

        def plain(partition: str, metadata: Mapping[str, Any]) -> None:
            now = time.monotonic()
            if now - last.get(partition, 0.0) >= PLAIN_EVERY_SECONDS:
                last[partition] = now
                print(f"{partition}: {progress_text(*_figures(metadata))}", file=stream)

        yield plain
        return

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "rows  {task.fields[rate]:.1f}/s  {task.fields[failed]} failed  "
            "${task.fields[cost]:.2f}"
        ),
        TimeElapsedColumn(),
        console=Console(file=stream),
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def live(partition: str, metadata: Mapping[str, Any]) -> None:
        done, total, failed, cost, rate = _figures(metadata)
        if partition not in tasks:
            tasks[partition] = bar.add_task(partition, total=total, rate=0.0, failed=0, cost=0.0)
        task = tasks[partition]
        bar.update(task, completed=done, total=total, rate=rate, failed=failed, cost=cost)

    with bar:
        yield live
