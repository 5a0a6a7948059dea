"""`flux2-pipeline materialize --retry-failed` over several partitions, some failed."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
from dagster import DagsterInstance

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.emulator import EmulatorServer
from tests.helpers.cli import CLI, cli_env
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

pytestmark = pytest.mark.slow

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def partition_runs(env: dict[str, str]) -> Counter[str]:
    """How many runs of flux2_edits each partition has had, from the Dagster instance.

    A run covers one partition (`dagster/partition`) or a range of them, in the order the
    partitions were added.
    """
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        order = instance.get_dynamic_partitions(Flux2Keys().partitions_name)
        counts: Counter[str] = Counter()
        for run in instance.get_runs():
            if Flux2Keys().edits not in (run.asset_selection or ()):
                continue
            if "dagster/partition" in run.tags:
                counts[run.tags["dagster/partition"]] += 1
            elif RANGE_START in run.tags:
                first, last = order.index(run.tags[RANGE_START]), order.index(run.tags[RANGE_END])
                counts.update(order[first : last + 1])
        return counts
    finally:
        instance.dispose()


def summary_keys(stdout: str) -> set[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("partition "))
    return {
        line.split()[0]
        for line in lines[start + 1 :]
        if line and line.split()[0] in {"good", "also_good", "broken", "gone"}
    }


def test_retry_failed_runs_only_the_failed_partitions(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    env = cli_env(tmp_path, emulator.base_url)
    base = emulator.base_url
    write_table(tmp_path / "prompts", "good", prompt_rows(base, "good", 2))
    write_table(tmp_path / "prompts", "also_good", prompt_rows(base, "also", 2))
    for key in ("broken", "gone"):
        rows = prompt_rows(base, key, 2)
        rows[1]["image_urls"] = [f"{base}/v1/outputs/{key}/0.png"]  # a reference that 404s
        write_table(tmp_path / "prompts", key, rows)

    first = subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 1, first.stdout + first.stderr
    assert summary_keys(first.stdout) == {"good", "also_good", "broken", "gone"}
    assert partition_runs(env) == {"good": 1, "also_good": 1, "broken": 1, "gone": 1}
    jobs = emulator.state.counters.jobs_created
    assert jobs == 6  # the 404 rows were never paid for

    retry = subprocess.run(
        [CLI, "materialize", "--retry-failed"], env=env, capture_output=True, text=True, timeout=300
    )
    assert retry.returncode == 1, retry.stdout + retry.stderr  # the references still 404
    assert summary_keys(retry.stdout) == {"broken", "gone"}
    assert partition_runs(env) == {"good": 1, "also_good": 1, "broken": 2, "gone": 2}
    assert emulator.state.counters.jobs_created == jobs  # completed rows reused, 404s not paid
