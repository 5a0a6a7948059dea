"""Money rules as a user meets them: `flux2-pipeline materialize` with step retries and re-runs.

Real CLI processes against the emulator in this process, which counts every paid job.
"""

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


def _materialize(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "materialize"], env=env, capture_output=True, text=True, timeout=240
    )


def test_rows_with_a_404_reference_are_never_paid_over_retries_and_reruns(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    rows = prompt_rows(emulator.base_url, "ref", 10)
    for i in (1, 4, 7):
        rows[i]["image_urls"] = [f"{emulator.base_url}/gone/ref-{i}.png"]
    write_table(tmp_path / "prompts", "refs", rows)
    env = cli_env(tmp_path, emulator.base_url, FLUX2_STEP_RETRIES="2", FLUX2_STEP_RETRY_DELAY="0")

    for _ in range(2):  # a run (with its step retries), then a re-run
        run = _materialize(env)
        assert run.returncode == 1, run.stdout + run.stderr
        assert "reference image cannot be fetched" in run.stdout
    assert emulator.state.counters.jobs_created == 7  # the 7 good rows, once each

    table = pq.read_table(tmp_path / "output" / "flux2_edits" / "refs.parquet").to_pylist()
    failed = {row["row_id"]: row["error"] for row in table if row["status"] == "failed"}
    assert sorted(failed) == ["ref-1", "ref-4", "ref-7"]
    for row_id, error in failed.items():
        assert f"/gone/{row_id}.png" in error and "404" in error
    assert [row["status"] for row in table].count("completed") == 7
    assert all(row["attempts"] == 0 for row in table if row["status"] == "failed")


def test_a_budget_stops_spending_and_a_raised_budget_pays_only_the_rest(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    emulator.state.faults.update(price_usd=0.05)
    write_table(tmp_path / "prompts", "spend", prompt_rows(emulator.base_url, "s", 30))
    money = {"FLUX2_PRICE_PER_IMAGE_USD": "0.05", "FLUX2_MAX_CONCURRENCY": "8"}
    env = cli_env(tmp_path, emulator.base_url, FLUX2_BUDGET_USD="0.50", **money)

    capped = _materialize(env)
    assert capped.returncode == 1, capped.stdout + capped.stderr
    assert "FLUX2_BUDGET_USD=0.5 would be exceeded" in capped.stdout
    paid = emulator.state.counters.jobs_created
    assert 1 <= paid <= 10

    raised = _materialize({**env, "FLUX2_BUDGET_USD": "1.50"})
    assert raised.returncode == 0, raised.stdout + raised.stderr
    assert emulator.state.counters.jobs_created == 30
    metadata = last_metadata(env)
    assert metadata["flux2/ledger_spent_usd"] == pytest.approx(1.50)
    assert metadata["flux2/new_spend_usd"] == pytest.approx(0.05 * (30 - paid))


def test_a_budget_whose_price_cannot_be_read_starts_nothing_and_says_what_to_set(
    tmp_path: Path,
) -> None:
    # Nothing listens on port 9: neither the model's price nor any job can be had.
    env = cli_env(tmp_path, "http://127.0.0.1:9", FLUX2_BUDGET_USD="5")
    write_table(tmp_path / "prompts", "priced", prompt_rows("http://127.0.0.1:9", "p", 2))
    run = _materialize(env)
    assert run.returncode == 1, run.stdout + run.stderr
    first = run.stdout.splitlines()[0]
    assert first.startswith("price unknown (the model route failed")
    assert "2 rows still to pay" in first
    assert "FLUX2_BUDGET_USD needs a price per image" in run.stdout
    assert "set FLUX2_PRICE_PER_IMAGE_USD" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
