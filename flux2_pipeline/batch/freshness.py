"""Results that follow the newest input: an older run never replaces a newer run's file.

Two runs of one partition can overlap: run 1 reads `x.parquet`, the file is replaced, run
2 reads the new version. Whichever ends last must not leave the old version's results in
place. `commit_for_input` commits a results file only if the input still has the content
the run read, and only if no run that read the input later has committed since; it holds
a lock on the results file (local output folders) while it checks, renames and writes the
version marker, so two commits of one partition never interleave.

The version marker is a small JSON file beside the results (`.x.parquet.input.json`): the
input's sha256 the results were made from and when that input was read. An older run that
loses the race fails its partition with `InputChanged`; its paid rows are in the ledger,
where the run for the new version reuses every row that did not change.

Example::

    read = InputRead.now(file_sha256(in_path))
    ...  # run the rows into `writer`
    try:
        commit_for_input(writer, in_path, read)
    except InputChanged as exc:
        print(exc)  # input changed while this run was working (sha256 ab12.. -> cd34..); ...
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from upath import UPath

from flux2_pipeline.batch.tables import file_sha256
from flux2_pipeline.paths import (
    ParquetStreamWriter,
    is_local,
    local_path,
    write_bytes_atomically,
)

SHA_SHOWN = 12
"""Hex digits of a sha256 shown in messages."""


@dataclass(frozen=True, slots=True)
class InputRead:
    """The input version a run works on: its sha256 and when the run read it (ns, wall clock)."""

    sha256: str
    read_at_ns: int

    @classmethod
    def now(cls, sha256: str) -> InputRead:
        """The version `sha256`, read now."""
        return cls(sha256, time.time_ns())


class InputChanged(RuntimeError):
    """The input is no longer the version this run read; a newer run writes the results.

    >>> "(sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb)" in str(InputChanged("a" * 64, "b" * 64))
    True
    """

    def __init__(self, old: str, new: str | None) -> None:
        self.old, self.new = old, new
        shown = new[:SHA_SHOWN] if new else "removed"
        super().__init__(
            f"input changed while this run was working (sha256 {old[:SHA_SHOWN]} -> {shown}); "
            "the run for the new version writes the results"
        )


def marker_path(results: UPath) -> UPath:
    """The version marker beside a results file: `.x.parquet.input.json`."""
    return results.with_name(f".{results.name}.input.json")


def read_marker(results: UPath) -> InputRead | None:
    """The input version the results file at `results` was made from, if recorded."""
    try:
        data = json.loads(marker_path(results).read_text())
        return InputRead(str(data["input_sha256"]), int(data["read_at_ns"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def commit_for_input(
    writer: ParquetStreamWriter, input_path: Path | UPath, read: InputRead
) -> None:
    """Commit `writer`'s file if the input is still the version `read`, else abort it.

    Raises `InputChanged` (after aborting the writer, so the file in place stays) when the
    input's sha256 is no longer `read.sha256`, or when the marker shows that a run which
    read a different version later than `read` has already committed.
    """
    with _results_lock(writer.path):
        try:
            current: str | None = file_sha256(input_path)
        except FileNotFoundError:
            current = None
        if current != read.sha256:
            writer.abort()
            raise InputChanged(read.sha256, current)
        newer = read_marker(writer.path)
        later = newer is not None and newer.read_at_ns > read.read_at_ns
        if later and newer is not None and newer.sha256 != read.sha256:
            writer.abort()
            raise InputChanged(read.sha256, newer.sha256)
        writer.commit()
        payload = {"input_sha256": read.sha256, "read_at_ns": read.read_at_ns}
        write_bytes_atomically(marker_path(writer.path), json.dumps(payload).encode())


def superseded(results: UPath, read: InputRead) -> InputChanged | None:
    """Why the results this run committed are no longer its own, or None if they still are.

    Checked just before a run reports its materialization: a newer run's commit since then
    means this run's metadata must not become the partition's latest.
    """
    marker = read_marker(results)
    if marker is None or marker == read:
        return None
    if marker.sha256 == read.sha256:
        return None  # the same content committed again: the metadata still describes it
    return InputChanged(read.sha256, marker.sha256)


@contextlib.contextmanager
def _results_lock(results: UPath) -> Iterator[None]:
    """Hold an exclusive lock on a local results file's lock file (released if we die).

    Object stores have no lock: there the checks above still run just before the one put.
    """
    if not is_local(results):
        yield
        return
    target = local_path(results)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_file = target.with_name(f".{target.name}.lock")
    with lock_file.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
