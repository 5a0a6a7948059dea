"""Streaming one huge row group through `read_input_rows` (ids checked) in constant memory.

Each size runs in a fresh child process (its own peak RSS, VmHWM), over a
real single-row-group Parquet file of rows with random prompts, half with given ids and
half with derived ones. The peak at 200,000 rows must stay within a fixed allowance of
the peak at 50,000 rows (past the allocator's warm-up): memory must not grow with the row count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SMALL, LARGE = 50_000, 200_000
ALLOWANCE_MB = 8.0
"""Measured on 2026-11-24: +1.3 to +3.2 MB between the two sizes (the id index's 4 MiB
page cache filling up); before ids moved to disk and column chunks were streamed: +29.5 MB."""

CHILD = """
import sys
from pathlib import Path
from flux2_pipeline.batch import read_input_rows

rows = valid = 0
for batch in read_input_rows(Path(sys.argv[1])):
    rows += len(batch)
    valid += sum(row.request is not None for row in batch)
peak_kib = next(
    int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")
)
print(rows, valid, peak_kib)
"""


def write_single_row_group(path: Path, rows: int) -> None:
    rng = os.urandom(40 * rows).hex()
    table = pa.table(
        {
            "id": [f"row-{i}" if i % 2 else None for i in range(rows)],
            "prompt": [rng[80 * i : 80 * i + 80] for i in range(rows)],
            "image_urls": [[f"http://127.0.0.1:9/samples/{i % 4}.png"] for i in range(rows)],
        }
    )
    pq.write_table(table, path, row_group_size=rows)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1


def peak_rss_mb(path: Path, rows: int) -> float:
    """The child's own peak RSS (VmHWM: this process image only, not its parent's)."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True
    )
    counted, valid, peak_kib = child.stdout.split()
    assert (int(counted), int(valid)) == (rows, rows)
    return int(peak_kib) / 1024


def test_a_single_row_group_streams_in_memory_independent_of_its_row_count(
    tmp_path: Path,
) -> None:
    peaks = {}
    for rows in (SMALL, LARGE):
        path = tmp_path / f"one-group-{rows}.parquet"
        write_single_row_group(path, rows)
        peaks[rows] = peak_rss_mb(path, rows)
    growth = peaks[LARGE] - peaks[SMALL]
    assert growth <= ALLOWANCE_MB, f"peak RSS {peaks}: +{growth:.1f} MB for 4x the rows"
