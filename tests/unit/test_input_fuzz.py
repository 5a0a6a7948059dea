"""Property: any Parquet table either fails whole with one line, or every row gets a verdict.

Random tables (every known column plus strangers, of odd Arrow types: binary,
large_string, dictionary-encoded strings, list<list<string>>, structs, timestamps,
nulls, unicode and huge strings) are written as real Parquet files. `read_input_rows`
must never crash: a whole-table problem is an `InputTableError` with a one-line
message; otherwise every row ends with a valid request or an invalid reason that
starts with the column it is about.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux2_pipeline.batch import InputTableError, read_input_rows
from flux2_pipeline.batch.tables import KNOWN_COLUMNS

HUGE = "é" * 300_000
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["https://img.test/a.png", "s3://bucket/k.png", "  ", "", HUGE]),
)
urls = st.sampled_from(["https://img.test/a.png", "http://127.0.0.1:1/b.png", "ftp://x/y", ""])

# (Arrow type, strategy for one non-null value)
COLUMN_KINDS: list[tuple[pa.DataType, st.SearchStrategy[Any]]] = [
    (pa.string(), texts),
    (pa.large_string(), texts),
    (pa.dictionary(pa.int32(), pa.string()), texts),
    (pa.binary(), st.binary(max_size=20)),
    (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    (pa.int8(), st.integers(-128, 127)),
    (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    (pa.bool_(), st.booleans()),
    (pa.list_(pa.string()), st.lists(st.one_of(urls, texts), max_size=5)),
    (pa.large_list(pa.string()), st.lists(urls, max_size=4)),
    (pa.list_(pa.list_(pa.string())), st.lists(st.lists(urls, max_size=2), max_size=2)),
    (pa.struct([("a", pa.int64())]), st.fixed_dictionaries({"a": st.integers(0, 9)})),
    (
        pa.timestamp("us", tz="UTC"),
        st.datetimes(
            min_value=dt.datetime(1970, 1, 1),
            max_value=dt.datetime(2100, 1, 1),
            timezones=st.just(dt.UTC),
        ),
    ),
    (pa.null(), st.none()),
]

column_names = st.sampled_from(sorted(KNOWN_COLUMNS | {"extra", "Prompt", "ünïcode"}))


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    rows = draw(st.integers(0, 12))
    names = draw(st.lists(column_names, min_size=1, max_size=9, unique=True))
    if draw(st.booleans()):  # mostly keep the required columns so rows get checked
        names = sorted({*names, "prompt", "image_urls"})
    columns = {}
    for name in names:
        kind, values = draw(st.sampled_from(COLUMN_KINDS))
        cells = draw(st.lists(st.one_of(st.none(), values), min_size=rows, max_size=rows))
        columns[name] = pa.array(cells, type=kind)
    return pa.table(columns)


def assert_verdicts(path: Path, table: pa.Table, batch_rows: int) -> None:
    try:
        rows = [row for batch in read_input_rows(path, batch_rows=batch_rows) for row in batch]
    except InputTableError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert not {"prompt", "image_urls"} <= set(table.column_names), message
        return
    assert [row.position for row in rows] == list(range(table.num_rows))
    for row in rows:
        assert (row.request is None) != (row.invalid_reason is None), row
        if row.invalid_reason is not None:
            column = row.invalid_reason.split(":", 1)[0]
            assert column in KNOWN_COLUMNS, row.invalid_reason
            assert "\n" not in row.invalid_reason
    valid_ids = [row.row_id for row in rows if row.request is not None]
    assert len(valid_ids) == len(set(valid_ids))


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    table=tables(),
    row_group_size=st.integers(1, 8),
    use_dictionary=st.booleans(),
    batch_rows=st.integers(1, 5),
)
def test_any_table_fails_whole_in_one_line_or_gives_every_row_a_verdict(
    tmp_path_factory: pytest.TempPathFactory,
    table: pa.Table,
    row_group_size: int,
    use_dictionary: bool,
    batch_rows: int,
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "input.parquet"
    pq.write_table(table, path, row_group_size=row_group_size, use_dictionary=use_dictionary)
    assert_verdicts(path, table, batch_rows)
