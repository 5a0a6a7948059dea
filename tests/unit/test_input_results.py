"""`ResultsWriter`: rows in order, in row groups of bounded count, the file only on commit."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from flux2_pipeline.batch import InputRow, ResultsWriter, RowOutcome


def outcome(position: int) -> RowOutcome:
    row = InputRow(position, f"r-{position}", "p", (), invalid_reason="prompt: must not be empty")
    return RowOutcome(row, "invalid", error=row.invalid_reason)


def test_rows_are_written_in_order_in_large_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    with ResultsWriter(path, flush_rows=1000, row_group_rows=16_000) as writer:
        for start in range(0, 40_000, 500):
            writer.write([outcome(i) for i in range(start, start + 500)])
        assert not path.exists()
    metadata = pq.ParquetFile(path).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sizes == [16_000, 16_000, 8_000]
    assert writer.rows_written == 40_000
    ids = pq.read_table(path, columns=["row_id"])["row_id"].to_pylist()
    assert ids == [f"r-{i}" for i in range(40_000)]
