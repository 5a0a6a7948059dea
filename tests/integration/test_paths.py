"""Writing to folders and to a real S3-compatible server through one path type."""

from __future__ import annotations

from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux2_pipeline.paths import as_path, atomic_writer, is_local, presign, write_bytes_atomically


def test_local_writes_appear_only_when_complete(tmp_path: Path) -> None:
    target = as_path(tmp_path / "out" / "t.parquet")
    assert is_local(target)
    with atomic_writer(target) as handle:
        pq.write_table(pa.table({"x": [1, 2, 3]}), handle)
    assert pq.read_table(str(target.path))["x"].to_pylist() == [1, 2, 3]

    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"half a file")
        raise RuntimeError("crash mid-write")
    assert pq.read_table(str(target.path)).num_rows == 3  # the old file is untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.parquet"]


def test_s3_round_trip_and_failed_write_leaves_nothing(s3_bucket: str) -> None:
    root = as_path(f"s3://{s3_bucket}/prefix")
    assert not is_local(root)
    target = root / "flux2_edits" / "cats.parquet"
    with atomic_writer(target) as handle:
        pq.write_table(pa.table({"row_id": ["a", "b"]}), handle)
    assert pq.read_table(target.path, filesystem=target.fs)["row_id"].to_pylist() == ["a", "b"]

    broken = root / "flux2_edits" / "broken.parquet"
    with pytest.raises(RuntimeError), atomic_writer(broken) as handle:
        handle.write(b"partial")
        raise RuntimeError("crash mid-upload")
    assert not broken.exists()


def test_presigned_urls_fetch_private_objects(s3_bucket: str) -> None:
    image = as_path(f"s3://{s3_bucket}/refs/cat.png")
    write_bytes_atomically(image, b"\x89PNG fake bytes")
    url = presign(f"s3://{s3_bucket}/refs/cat.png", expires=600)
    assert url.startswith("http") and "Signature" in url
    assert httpx.get(url, timeout=10).content == b"\x89PNG fake bytes"
    with pytest.raises(ValueError, match="only s3://"):
        presign("https://example.test/a.png", expires=60)
