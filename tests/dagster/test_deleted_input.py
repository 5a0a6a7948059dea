"""Deleting an input file drops its rows from the training dataset on the next build."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from flux2_pipeline.emulator import EmulatorServer
from tests.helpers.cli import CLI, cli_env
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

pytestmark = pytest.mark.slow


def dataset_partitions(output: Path) -> list[str]:
    shards = sorted(str(p) for p in (output / "flux2_training_dataset").rglob("*.parquet"))
    table = ds.dataset(shards, format="parquet").to_table(columns=["partition"])
    return sorted(table["partition"].to_pylist())


def test_a_deleted_input_file_leaves_the_training_dataset(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    env = cli_env(tmp_path, emulator.base_url)
    write_table(tmp_path / "prompts", "kept", prompt_rows(emulator.base_url, "kept", 2))
    doomed = write_table(
        tmp_path / "prompts", "doomed", prompt_rows(emulator.base_url, "doomed", 3)
    )

    first = subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert dataset_partitions(tmp_path / "output") == ["doomed"] * 3 + ["kept"] * 2

    doomed.unlink()
    again = subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert dataset_partitions(tmp_path / "output") == ["kept"] * 2
    assert emulator.state.counters.jobs_created == 5  # nothing paid again
