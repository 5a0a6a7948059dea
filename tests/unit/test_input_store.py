"""FLUX2_INPUT_DIR as an fsspec URL: checked once, listed, read; never shown with a secret.

fsspec's in-memory filesystem (`memory://`) stands for any store here; the S3 server
tests are in tests/dagster/test_s3_input.py.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux2_pipeline.batch import file_sha256, input_shape, read_input_rows
from flux2_pipeline.paths import as_path, is_fsspec_uri, list_files
from flux2_pipeline.resources import Flux2Storage
from flux2_pipeline.settings import Settings, SettingsError

SECRET = "wJalrXUtnFEMI-K7MDENG"


@pytest.fixture
def memory_dir() -> Iterator[str]:
    """A fresh folder of fsspec's in-memory filesystem, removed afterwards."""
    root = f"flux2-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def put(url: str, rows: list[dict[str, object]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    with fsspec.open(url, "wb") as handle:
        handle.write(buffer.getvalue())
    return buffer.getvalue()


@pytest.mark.parametrize(
    "url",
    [
        f"s3://AKIAEXAMPLE:{SECRET}@bucket/prompts",
        f"s3://bucket/prompts?X-Amz-Signature={SECRET}",
        f"https://user:{SECRET}@example.com/prompts",
    ],
)
def test_a_url_with_credentials_is_refused_without_showing_them(url: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"FLUX2_INPUT_DIR": url})
    message = str(raised.value)
    assert message.startswith("FLUX2_INPUT_DIR must be a ")
    assert "without credentials or a query string" in message
    assert SECRET not in message and "AKIAEXAMPLE" not in message


def test_a_url_without_a_bucket_is_refused() -> None:
    with pytest.raises(SettingsError, match="FLUX2_INPUT_DIR must name a bucket"):
        Settings.from_env({"FLUX2_INPUT_DIR": "s3:///prompts"})


def test_a_local_folder_stays_a_local_path(tmp_path: Path) -> None:
    storage = Flux2Storage(input_dir=str(tmp_path / "prompts"))
    assert not storage.input_is_remote
    assert isinstance(storage.input_path("cats"), Path)
    assert storage.input_path("cats") == tmp_path / "prompts" / "cats.parquet"
    assert storage.input_dir_problem() == f"{tmp_path / 'prompts'} is not a folder"
    (tmp_path / "prompts").mkdir()
    assert storage.input_dir_problem() is None


def test_prompt_tables_in_a_store_are_listed_read_and_hashed(memory_dir: str) -> None:
    rows = [
        {"id": f"r{i}", "prompt": f"edit {i}", "image_urls": ["https://e.com/a.png"]}
        for i in range(3)
    ]
    data = put(f"{memory_dir}/cats.parquet", rows)
    put(f"{memory_dir}/a...b.parquet", rows)
    put(f"{memory_dir}/.hidden.parquet", rows)
    put(f"{memory_dir}/nested/dogs.parquet", rows)
    with fsspec.open(f"{memory_dir}/notes.txt", "wb") as handle:
        handle.write(b"not a table")

    storage = Flux2Storage(input_dir=memory_dir + "/")
    assert storage.input_dir == memory_dir and storage.input_is_remote
    assert storage.input_dir_problem() is None
    scan = storage.scan_inputs()
    assert list(scan.found) == ["cats"]
    assert str(scan.found["cats"]) == f"{memory_dir}/cats.parquet"
    assert scan.skipped == {
        "a...b.parquet": "contains '...', which Dagster reserves for partition ranges"
    }
    assert scan.signatures["cats"] is not None
    assert scan.signatures["cats"].startswith(f"{len(data)}:")

    path = storage.input_path("cats")
    assert path == scan.found["cats"]
    assert input_shape(path) == (3, 3)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    [batch] = list(read_input_rows(path))
    assert [row.row_id for row in batch] == ["r0", "r1", "r2"]
    assert all(row.request is not None for row in batch)


def test_a_replaced_object_gets_a_new_signature(memory_dir: str) -> None:
    rows = [{"prompt": "edit", "image_urls": ["https://e.com/a.png"]}]
    put(f"{memory_dir}/cats.parquet", rows)
    [before] = list_files(as_path(memory_dir), ".parquet")
    put(f"{memory_dir}/cats.parquet", rows * 2)
    [after] = list_files(as_path(memory_dir), ".parquet")
    assert before.signature != after.signature


def test_which_texts_are_store_urls() -> None:
    assert is_fsspec_uri("s3://bucket/prompts") and is_fsspec_uri("gcs://bucket/prompts")
    assert not is_fsspec_uri("/data/prompts") and not is_fsspec_uri("file:///data/prompts")
    assert not is_fsspec_uri("C:\\data\\prompts") and not is_fsspec_uri("nosuchscheme://x")
