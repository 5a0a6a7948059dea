"""Cost through the CLI: each row's cost is what the emulator charged, the partition's
total is their sum, and a re-run that reuses every job spends nothing new."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux2_pipeline.emulator import EmulatorServer
from tests.helpers.cli import CLI, cli_env, last_metadata
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

pytestmark = pytest.mark.slow


def test_cost_per_row_total_and_no_new_spend_on_a_rerun(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    price = emulator.state.faults.price_usd  # per image, the emulator's default
    env = cli_env(tmp_path, emulator.base_url)
    rows = prompt_rows(emulator.base_url, "paid", 6)
    for index, row in enumerate(rows):
        row["num_images"] = index % 3 + 1  # 1, 2, 3, 1, 2, 3 images
    write_table(tmp_path / "prompts", "paid", rows)

    first = subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stdout + first.stderr
    results = pq.read_table(tmp_path / "output" / "flux2_edits" / "paid.parquet").to_pylist()
    charged = [round(price * row["num_images"], 6) for row in rows]
    assert [row["cost_usd"] for row in results] == pytest.approx(charged)
    total = sum(charged)
    assert total == pytest.approx(price * 12)
    metadata = last_metadata(env)
    assert metadata["flux2/cost_usd"] == pytest.approx(total)
    assert metadata["flux2/new_spend_usd"] == pytest.approx(total)
    jobs = emulator.state.counters.jobs_created
    assert jobs == 6

    again = subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert emulator.state.counters.jobs_created == jobs  # every job reused, none paid again
    metadata = last_metadata(env)
    assert metadata["flux2/reused_completed"] == 6
    assert metadata["flux2/cost_usd"] == pytest.approx(total)  # the partition still cost this
    assert metadata["flux2/new_spend_usd"] == 0  # but nothing of it is new spend
    results = pq.read_table(tmp_path / "output" / "flux2_edits" / "paid.parquet").to_pylist()
    assert [row["cost_usd"] for row in results] == pytest.approx(charged)
