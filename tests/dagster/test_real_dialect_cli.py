"""`flux2-pipeline materialize` against a service that speaks as RunComfy's own clients show.

The emulator in its documented dialect: `succeeded`, HTTP 200 error bodies, `400005` while
a result is not ready, `cost` on results, the model's published price, the account's
balance, and a balance that runs out (`400002`, as HTTP 400 or HTTP 200).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger
from tests.helpers.cli import CLI, cli_env
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table

pytestmark = pytest.mark.slow


def _materialize(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "materialize", "--select", "flux2_edits"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _rows(tmp_path: Path, key: str) -> list[dict[str, object]]:
    return pq.read_table(tmp_path / "output" / "flux2_edits" / f"{key}.parquet").to_pylist()


@pytest.fixture
def service() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(port=0, latency=0.2, max_concurrent=8, token=TEST_TOKEN, seed=11)
    with EmulatorServer(config) as server:
        yield server


def test_succeeded_not_ready_and_http_200_errors_all_complete_each_paid_once(
    tmp_path: Path, service: EmulatorServer
) -> None:
    service.state.faults.update(succeeded_rate=0.5, result_lag=0.3, fault_200_error=0.05)
    write_table(tmp_path / "prompts", "real", prompt_rows(service.base_url, "real", 40))
    run = _materialize(cli_env(tmp_path, service.base_url))
    assert run.returncode == 0, run.stdout + run.stderr
    counters = service.state.counters
    assert counters.jobs_created == 40 and counters.duplicate_bodies == 0
    assert counters.results_not_ready > 0 and counters.errors_200 > 0
    rows = _rows(tmp_path, "real")
    assert [row["status"] for row in rows] == ["completed"] * 40
    assert [row["attempts"] for row in rows] == [1] * 40
    assert [row["cost_usd"] for row in rows] == pytest.approx([0.025] * 40)  # the service's


@pytest.mark.parametrize("http_200", [False, True], ids=["http-400", "http-200"])
def test_a_balance_that_runs_out_stops_the_run_and_a_top_up_pays_only_the_rest(
    tmp_path: Path, service: EmulatorServer, http_200: bool
) -> None:
    # Enough for 10 jobs; 30 rows, 8 in flight. The check before the start only warns here,
    # so the refusal comes from the service mid-run.
    service.state.update_settings({"balance_usd": 0.25, "balance_error_http_200": http_200})
    write_table(tmp_path / "prompts", "broke", prompt_rows(service.base_url, "broke", 30))
    env = cli_env(tmp_path, service.base_url, FLUX2_BALANCE_CHECK="warn")
    run = _materialize(env)
    assert run.returncode == 1, run.stdout + run.stderr
    first = run.stdout.splitlines()[0]
    assert "30 rows still to pay" in first and "balance 0.2500 USD" in first
    assert "cannot cover" in run.stdout  # the warning
    counters = service.state.counters
    assert counters.jobs_created == 10
    # Only submits already on their way when the first refusal came back are refused.
    assert 1 <= counters.rejected_400002 <= 8
    rows = _rows(tmp_path, "broke")
    refused = [row for row in rows if row["status"] == "failed"]
    assert len(refused) == 20
    for row in refused:
        error = str(row["error"])
        assert error.startswith("not submitted: account balance too low (400002)"), error
        assert "duplicate" not in error and row["request_id"] is None and row["attempts"] == 0
    assert "account balance too low (400002)" in run.stdout
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'output' / 'ledger.sqlite'}")
    try:
        assert ledger.spent_usd() == pytest.approx(0.25)  # refused submits cost nothing
    finally:
        ledger.close()

    service.state.update_settings({"balance_usd": 10.0})  # the top-up
    rerun = _materialize(env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert service.state.counters.jobs_created == 30
    assert service.state.counters.duplicate_bodies == 0
    assert [row["status"] for row in _rows(tmp_path, "broke")] == ["completed"] * 30


def test_a_balance_that_cannot_cover_the_run_stops_it_before_the_first_submit(
    tmp_path: Path, service: EmulatorServer
) -> None:
    service.state.update_settings({"balance_usd": 0.1})
    write_table(tmp_path / "prompts", "short", prompt_rows(service.base_url, "short", 10))
    run = _materialize(cli_env(tmp_path, service.base_url))
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == (
        "price 0.025 USD/image (the model's published price); 10 rows still to pay "
        "(10 images), about 0.2500 USD; balance 0.1000 USD"
    )
    assert "not started: the account's balance (0.1000 USD) cannot cover" in run.stdout
    assert "FLUX2_BALANCE_CHECK=warn" in run.stdout
    assert service.state.counters.submits_total == 0
    assert "Traceback" not in run.stdout + run.stderr


def test_a_budget_alone_takes_the_models_published_price(
    tmp_path: Path, service: EmulatorServer
) -> None:
    service.state.faults.update(price_usd=0.05)
    write_table(tmp_path / "prompts", "budget", prompt_rows(service.base_url, "budget", 10))
    run = _materialize(cli_env(tmp_path, service.base_url, FLUX2_BUDGET_USD="0.2"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.startswith("price 0.05 USD/image (the model's published price)")
    assert service.state.counters.jobs_created == 4  # 0.2 USD at 0.05 a job
    rows = _rows(tmp_path, "budget")
    assert sum(row["status"] == "completed" for row in rows) == 4
    over = [row for row in rows if row["status"] == "failed"]
    assert len(over) == 6
    assert all("FLUX2_BUDGET_USD=0.2 would be exceeded" in str(row["error"]) for row in over)
