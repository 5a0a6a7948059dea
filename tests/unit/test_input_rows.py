"""`read_input_rows` on real Parquet files: ids, URL columns, and what counts as invalid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux2_pipeline.batch import InputRow, read_input_rows

URL = "https://img.test/cat.png"


def read_all(path: Path, **kwargs: Any) -> list[InputRow]:
    return [row for batch in read_input_rows(path, **kwargs) for row in batch]


def write(tmp_path: Path, table: pa.Table, name: str = "t") -> Path:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path)
    return path


def derived_id_of(tmp_path: Path, prompt: str) -> str:
    """The id the reader derives for an id-less row with this content."""
    path = write(tmp_path, pa.table({"prompt": [prompt], "image_urls": [[URL]]}), "probe")
    (row,) = read_all(path)
    assert row.row_id.startswith("h-")
    return row.row_id


def test_an_explicit_id_equal_to_a_later_rows_derived_id_leaves_one_namespace(
    tmp_path: Path,
) -> None:
    derived = derived_id_of(tmp_path, "make it snow")
    table = pa.table(
        {
            "id": [derived, None, None],
            "prompt": ["another edit", "make it snow", "make it snow"],
            "image_urls": [[URL], [URL], [URL]],
        }
    )
    rows = read_all(write(tmp_path, table))
    assert all(row.request is not None for row in rows), [r.invalid_reason for r in rows]
    ids = [row.row_id for row in rows]
    assert ids[0] == derived
    assert len(set(ids)) == 3, ids
    # Stable: the same file gives the same ids again (a re-run pays for nothing new).
    assert [row.row_id for row in read_all(write(tmp_path, table))] == ids


def test_an_explicit_id_equal_to_an_earlier_rows_derived_id_is_invalid(tmp_path: Path) -> None:
    derived = derived_id_of(tmp_path, "make it snow")
    table = pa.table(
        {
            "id": [None, derived],
            "prompt": ["make it snow", "another edit"],
            "image_urls": [[URL], [URL]],
        }
    )
    first, second = read_all(write(tmp_path, table))
    assert first.row_id == derived and first.request is not None
    assert second.request is None
    assert second.invalid_reason is not None
    assert second.invalid_reason.startswith("id: ")
    assert "unique" in second.invalid_reason and repr(derived) in second.invalid_reason


def test_repeated_content_keeps_its_numbered_ids_across_batches(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["same"] * 5, "image_urls": [[URL]] * 5})
    rows = read_all(write(tmp_path, table), batch_rows=2)
    base = rows[0].row_id
    assert [row.row_id for row in rows] == [base] + [f"{base}-{n}" for n in range(2, 6)]


def test_an_explicit_id_taking_a_numbered_derived_id_shifts_only_that_row(
    tmp_path: Path,
) -> None:
    base = derived_id_of(tmp_path, "same")
    table = pa.table(
        {
            "id": [f"{base}-2", None, None, None],
            "prompt": ["other", "same", "same", "same"],
            "image_urls": [[URL]] * 4,
        }
    )
    rows = read_all(write(tmp_path, table), batch_rows=3)
    assert [row.row_id for row in rows] == [f"{base}-2", base, f"{base}-3", f"{base}-4"]
    assert all(row.request is not None for row in rows)


def test_a_string_image_urls_column_counts_each_value_as_one_url(tmp_path: Path) -> None:
    table = pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "image_urls": [URL, URL]})
    rows = read_all(write(tmp_path, table))
    assert [row.invalid_reason for row in rows] == [None, None]
    assert [row.image_urls for row in rows] == [(URL,), (URL,)]
    assert rows[0].request is not None and rows[0].request.image_urls == (URL,)


def test_a_string_s3_uri_is_signed_and_kept_as_written(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["p"], "image_urls": ["s3://bucket/cat.png"]})
    (row,) = read_all(write(tmp_path, table), sign_url=lambda uri: f"https://signed.test/{uri[5:]}")
    assert row.invalid_reason is None
    assert row.request is not None
    assert row.request.image_urls == ("https://signed.test/bucket/cat.png",)
    assert row.image_urls == ("s3://bucket/cat.png",)


def test_a_signer_failure_is_that_rows_invalid_reason(tmp_path: Path) -> None:
    def refuse(uri: str) -> str:
        raise PermissionError("no credentials")

    table = pa.table({"prompt": ["p", "q"], "image_urls": [["s3://b/k.png"], [URL]]})
    first, second = read_all(write(tmp_path, table), sign_url=refuse)
    assert first.invalid_reason is not None
    assert first.invalid_reason.startswith("image_urls: cannot pre-sign s3://b/k.png")
    assert second.invalid_reason is None


def test_integer_ids_that_pandas_turned_into_floats_are_accepted(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"id": [1, None, 3], "prompt": ["a", "b", "c"], "image_urls": [[URL], [URL], [URL]]}
    )
    assert frame["id"].dtype == "float64"
    path = tmp_path / "floats.parquet"
    frame.to_parquet(path)
    rows = read_all(path)
    assert [row.invalid_reason for row in rows] == [None, None, None]
    assert rows[0].row_id == "1" and rows[2].row_id == "3"
    assert rows[1].row_id.startswith("h-")


@pytest.mark.parametrize(
    ("value", "rule"),
    [(1.5, "integer"), (float("inf"), "integer"), (2.0**60, "2**53")],
)
def test_non_integral_or_imprecise_float_ids_are_invalid(
    tmp_path: Path, value: float, rule: str
) -> None:
    table = pa.table({"id": [value], "prompt": ["p"], "image_urls": [[URL]]})
    (row,) = read_all(write(tmp_path, table))
    assert row.request is None
    assert row.invalid_reason is not None
    assert row.invalid_reason.startswith("id: ") and rule in row.invalid_reason
