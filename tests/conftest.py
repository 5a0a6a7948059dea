"""Fixtures shared by every test layer: sample tables and a running emulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer

TEST_TOKEN = "tok-ZQ8xv3Lr5Hn0wPq2"


def write_table(folder: Path, name: str, rows: list[dict[str, Any]] | pa.Table) -> Path:
    """Write `rows` as `<folder>/<name>.parquet` and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    path = folder / f"{name}.parquet"
    pq.write_table(table, path)
    return path


def prompt_rows(base_url: str, prefix: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    """`count` valid rows whose reference images the emulator serves."""
    return [
        {
            "id": f"{prefix}-{i}",
            "prompt": f"{prefix} edit number {i}",
            "image_urls": [f"{base_url}/samples/{prefix}-{i % 3}.png"],
            "seed": i,
            **extra,
        }
        for i in range(count)
    ]


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    """A token-protected emulator on a free loopback port; tests adjust `state.faults`."""
    config = EmulatorConfig(
        port=0, latency=0.05, max_concurrent=32, token=TEST_TOKEN, retry_after="0.05", seed=1
    )
    with EmulatorServer(config) as server:
        yield server
