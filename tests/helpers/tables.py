"""Parquet tables and a partition's stored files, written directly.

`write_table` writes rows as an input table; `stored_png` stores a small real image and
returns its manifest columns; `write_completed_results` writes a results file the way the
edits step lays it out (`RESULTS_SCHEMA`, its row groups), every column not given left null.

Example:
    >>> path = write_table(tmp_path / "prompts", "cats", [{"id": "a", "prompt": "p"}])
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from flux2_pipeline.batch import RESULTS_SCHEMA
from flux2_pipeline.batch.tables import RESULTS_ROW_GROUP_ROWS
from flux2_pipeline.media import ImageStore, inspect_image


def write_table(folder: Path, name: str, rows: list[dict[str, Any]] | pa.Table) -> Path:
    """Write `rows` as `<folder>/<name>.parquet` and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    path = folder / f"{name}.parquet"
    pq.write_table(table, path)
    return path


def stored_png(store: ImageStore, shade: int) -> dict[str, object]:
    """The manifest columns of a small PNG, stored."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (shade, 80, 120)).save(buffer, format="PNG")
    info = inspect_image(buffer.getvalue())
    stored = store.put(buffer.getvalue(), info.sha256, info.ext)
    return {
        "sha256": info.sha256,
        "path": stored.relative,
        "width": info.width,
        "height": info.height,
        "format": info.format,
        "bytes": info.bytes,
    }


def write_completed_results(path: Path, columns: dict[str, list[object]], rows: int) -> None:
    """`columns` as a results file at `path`; the other results columns are null."""
    filled = columns | {name: [None] * rows for name in RESULTS_SCHEMA.names if name not in columns}
    path.parent.mkdir(parents=True)
    table = pa.Table.from_pydict(filled, schema=RESULTS_SCHEMA)
    pq.write_table(table, path, row_group_size=RESULTS_ROW_GROUP_ROWS)
