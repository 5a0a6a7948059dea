"""`AtomicFile`: bytes appear under the name only on commit, locally and in an object store."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux2_pipeline.batch import RowStatus
from flux2_pipeline.paths import AtomicFile, as_path, atomic_writer


def test_commit_moves_the_bytes_into_place_and_abort_keeps_the_old_file(tmp_path: Path) -> None:
    path = as_path(tmp_path / "out" / "table.parquet")
    first = AtomicFile(path)
    first.handle.write(b"first")
    assert not Path(path).exists()  # nothing under the name before the commit
    first.commit()
    assert Path(path).read_bytes() == b"first"

    second = AtomicFile(path)
    second.handle.write(b"half of a second")
    second.abort()
    assert Path(path).read_bytes() == b"first"
    assert [p.name for p in Path(path).parent.iterdir()] == ["table.parquet"]  # no temp left
    second.commit()  # after abort, nothing more happens
    assert Path(path).read_bytes() == b"first"


def test_the_context_manager_aborts_on_an_error(tmp_path: Path) -> None:
    path = as_path(tmp_path / "x.bin")
    with pytest.raises(RuntimeError), atomic_writer(path) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_an_object_store_sees_the_object_only_on_commit(s3_bucket: str) -> None:
    path = as_path(f"s3://{s3_bucket}/out/shard.parquet")
    target = AtomicFile(path)
    target.handle.write(b"bytes")
    assert not path.exists()
    target.commit()
    assert path.read_bytes() == b"bytes"
    dropped = AtomicFile(as_path(f"s3://{s3_bucket}/out/other.parquet"))
    dropped.handle.write(b"never")
    dropped.abort()
    assert not as_path(f"s3://{s3_bucket}/out/other.parquet").exists()


def test_row_statuses_are_the_contracts_strings() -> None:
    assert [str(s) for s in RowStatus] == ["completed", "failed", "invalid", "cancelled"]
    assert RowStatus.COMPLETED == "completed"
