"""`commit_for_input`: results are committed only for the input version still current."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux2_pipeline.batch import file_sha256
from flux2_pipeline.batch.freshness import (
    InputChanged,
    InputRead,
    commit_for_input,
    marker_path,
    read_marker,
    superseded,
)
from flux2_pipeline.paths import ParquetStreamWriter, as_path

SCHEMA = pa.schema([("n", pa.int64())])


def write_input(path: Path, rows: int) -> str:
    pq.write_table(pa.table({"n": list(range(rows))}), path)
    return file_sha256(path)


def results_writer(out: Path, value: int) -> ParquetStreamWriter:
    writer = ParquetStreamWriter(as_path(out), SCHEMA)
    writer.write_row({"n": value})
    return writer


def written(out: Path) -> list[int]:
    return [row["n"] for row in pq.read_table(out).to_pylist()]


def test_a_commit_for_the_current_input_writes_the_results_and_the_marker(
    tmp_path: Path,
) -> None:
    source, out = tmp_path / "x.parquet", tmp_path / "out" / "x.parquet"
    read = InputRead.now(write_input(source, 3))
    commit_for_input(results_writer(out, 1), source, read)
    assert written(out) == [1]
    assert read_marker(as_path(out)) == read
    assert marker_path(as_path(out)).name == ".x.parquet.input.json"
    assert superseded(as_path(out), read) is None


def test_a_replaced_or_removed_input_aborts_the_commit_and_keeps_the_file(
    tmp_path: Path,
) -> None:
    source, out = tmp_path / "x.parquet", tmp_path / "out" / "x.parquet"
    old = InputRead.now(write_input(source, 3))
    new_sha = write_input(source, 4)
    commit_for_input(results_writer(out, 2), source, InputRead.now(new_sha))
    with pytest.raises(InputChanged) as caught:
        commit_for_input(results_writer(out, 1), source, old)
    assert str(caught.value) == (
        f"input changed while this run was working (sha256 {old.sha256[:12]} -> "
        f"{new_sha[:12]}); the run for the new version writes the results"
    )
    assert written(out) == [2]
    source.unlink()
    with pytest.raises(InputChanged, match=r"-> removed\)"):
        commit_for_input(results_writer(out, 1), source, old)
    assert written(out) == [2]
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_run_that_read_earlier_never_replaces_a_later_run_s_commit(tmp_path: Path) -> None:
    # A then B then A again: the input is A's content once more, but a run that read it
    # after the first run committed B's results; the first run's commit is refused.
    source, out = tmp_path / "x.parquet", tmp_path / "out" / "x.parquet"
    first = InputRead.now(write_input(source, 3))
    b_sha = write_input(source, 4)
    commit_for_input(results_writer(out, 2), source, InputRead.now(b_sha))
    write_input(source, 3)
    with pytest.raises(InputChanged):
        commit_for_input(results_writer(out, 1), source, first)
    assert written(out) == [2]
    # ...and a run that committed first learns, before it reports, that it was superseded.
    later = InputRead.now(first.sha256)
    assert superseded(as_path(out), first) is not None
    commit_for_input(results_writer(out, 3), source, later)
    assert superseded(as_path(out), first) is None  # the same content: its figures hold
    assert written(out) == [3]


def test_commits_of_one_partition_take_turns(tmp_path: Path) -> None:
    source, out = tmp_path / "x.parquet", tmp_path / "out" / "x.parquet"
    read = InputRead.now(write_input(source, 3))
    errors: list[BaseException] = []

    def commit(value: int) -> None:
        try:
            for _ in range(20):
                commit_for_input(results_writer(out, value), source, read)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(value,)) for value in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert written(out) in ([1], [2], [3])
    assert read_marker(as_path(out)) == read
