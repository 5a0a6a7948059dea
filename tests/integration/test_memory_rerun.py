"""Re-running a partition through `flux2-pipeline materialize` in memory independent of its size.

Every row of the partition is already completed in the ledger, so the re-run makes no API
call: it reads and validates the input, looks every row up in the ledger, writes the
results and runs the asset checks on them. Each size runs in a fresh child process that
reports its own peak RSS (VmHWM: that process image only; ru_maxrss would also count the
test process it was started from). The peak at LARGE rows must stay within a fixed
allowance of the peak at SMALL rows.

The ledger is seeded directly with one completed attempt per row (what a first run
writes), so the test does not wait for tens of thousands of emulated jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import insert

from flux2_pipeline.batch import read_input_rows
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.ledger import Ledger, make_row_key
from flux2_pipeline.ledger.schema import submissions
from tests.helpers.emulator import TEST_TOKEN

SMALL, LARGE = 20_000, 100_000
ALLOWANCE_MB = 12.0
"""Measured on 2026-11-24: -0.3 MB between these two sizes (+7 MB between 10k and 120k
rows, where the first results row group is written); before the asset checks streamed the
results file, +30 MB (311.8 -> 341.8 MB)."""
KEY = "rerun"
CLI = """
import atexit
import sys
from flux2_pipeline.cli import main

def report_peak() -> None:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    print(f"peak_kib {peak}", file=sys.stderr)

atexit.register(report_peak)
main(sys.argv[1:])
"""

pytestmark = pytest.mark.slow


def write_input(path: Path, rows: int, base_url: str) -> None:
    """The prompt table, in 50,000-row groups as a large table is usually written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": [f"row-{i}" for i in range(rows)],
            "prompt": [f"make it snow, variant {i}" for i in range(rows)],
            "image_urls": [[f"{base_url}/samples/s-{i % 4}.png"] for i in range(rows)],
        }
    )
    pq.write_table(table, path, row_group_size=50_000)


def seed_completed(ledger_path: Path, input_path: Path) -> None:
    """One completed, paid attempt per row, keyed as the runner keys it."""
    now = datetime.now(UTC)
    with Ledger.open(ledger_path) as ledger, ledger.engine.begin() as conn:
        for batch in read_input_rows(input_path):
            conn.execute(
                insert(submissions),
                [
                    {
                        "row_key": make_row_key(KEY, row.row_id, row.fingerprint or ""),
                        "partition": KEY,
                        "row_id": row.row_id,
                        "request_hash": row.fingerprint,
                        "attempt": 1,
                        "state": "completed",
                        "request_id": f"job-{row.position}",
                        "intent_at": now,
                        "submitted_at": now,
                        "finished_at": now,
                        "cost_usd": 0.025,
                        "charge_usd": 0.025,
                        "output_urls": json.dumps([f"https://cdn.test/{row.position}.png"]),
                        "updated_at": now,
                    }
                    for row in batch
                ],
            )


def rerun_peak_mb(tmp_path: Path, rows: int, emulator: EmulatorServer) -> float:
    """Seed a ledger for `rows` completed rows, re-run the partition, return its peak RSS."""
    workdir = tmp_path / str(rows)
    input_path = workdir / "prompts" / f"{KEY}.parquet"
    write_input(input_path, rows, emulator.base_url)
    seed_completed(workdir / "output" / "ledger.sqlite", input_path)
    home = workdir / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_", "DAGSTER_"))
    }
    env.update(
        RUNCOMFY_BASE_URL=emulator.base_url,
        RUNCOMFY_API_TOKEN=TEST_TOKEN,
        FLUX2_INPUT_DIR=str(input_path.parent),
        FLUX2_OUTPUT_DIR=str(workdir / "output"),
        FLUX2_STEP_RETRIES="0",
        DAGSTER_HOME=str(home),
    )
    child = subprocess.run(
        [sys.executable, "-c", CLI, "materialize", "--partition", KEY, "--select", "flux2_edits"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    results = pq.read_table(workdir / "output" / "flux2_edits" / f"{KEY}.parquet")
    assert results.num_rows == rows
    assert set(results["status"].to_pylist()) == {"completed"}
    peak_kib = child.stderr.rsplit("peak_kib ", 1)[1].split()[0]
    return int(peak_kib) / 1024


def test_a_rerun_uses_the_same_memory_whatever_the_partition_size(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    peaks = {rows: rerun_peak_mb(tmp_path, rows, emulator) for rows in (SMALL, LARGE)}
    # Every row was found completed: the re-runs sent nothing to the API.
    assert emulator.state.counters.submits_total == 0
    growth = peaks[LARGE] - peaks[SMALL]
    assert growth <= ALLOWANCE_MB, f"peak RSS {peaks}: +{growth:.1f} MB for 5x the rows"
