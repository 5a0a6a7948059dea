"""deploy/dagster.yaml works: a PostgreSQL-backed instance with the `concurrency:` limits
materializes a partition; deploy/celery/dagster.yaml loads the same way."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from dagster._core.instance.config import PoolGranularity
from sqlalchemy import create_engine, text

from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.materialize import materialize_partitions
from flux2_pipeline.settings import Settings
from tests.conftest import prompt_rows, write_table

REPO = Path(__file__).resolve().parents[2]
SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"

pytestmark = pytest.mark.postgres


@pytest.fixture
def scratch_database() -> Iterator[str]:
    """A throwaway PostgreSQL database on the local server, dropped afterwards.

    The URL names the psycopg2 driver: SQLAlchemy 2.1 maps a bare postgresql:// to
    psycopg 3, which dagster-postgres does not support (see deploy/dagster.yaml).
    """
    name = f"flux2_deploy_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_the_deploy_profile_runs_on_postgresql(
    tmp_path: Path,
    settings: Settings,
    emulator: EmulatorServer,
    scratch_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", scratch_database)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    write_table(Path(settings.storage.input_dir), "prod", prompt_rows(emulator.base_url, "prod", 4))

    instance = DagsterInstance.get()
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        _assert_concurrency_limits(instance)
        (summary,) = materialize_partitions(settings, instance=instance)
        assert summary.succeeded and summary.completed == 4
        assert instance.get_dynamic_partitions("flux2_prompt_tables") == ["prod"]
        # One run for the partition (edits, images), one for the unpartitioned dataset.
        assert len(instance.get_run_records()) == 2
    finally:
        instance.dispose()


def _assert_concurrency_limits(instance: DagsterInstance, max_runs: int = 4) -> None:
    """The limits deploy/README.md explains are the ones Dagster read from the profile."""
    config = instance.get_concurrency_config()
    assert config.run_queue_config is not None
    assert config.run_queue_config.max_concurrent_runs == max_runs
    [partition_limit] = config.run_queue_config.tag_concurrency_limits
    assert partition_limit == {
        "key": "dagster/partition",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    }
    assert config.pool_config.default_pool_limit == max_runs
    assert config.pool_config.pool_granularity is PoolGranularity.RUN
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 300
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 1


def test_the_celery_profile_loads_on_postgresql(
    tmp_path: Path, scratch_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "celery_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "celery" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", scratch_database)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = DagsterInstance.get()
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        _assert_concurrency_limits(instance, max_runs=8)
    finally:
        instance.dispose()


def test_the_helm_values_carry_the_same_limits_and_secrets() -> None:
    """deploy/kubernetes/values.yaml (not deployed here) says what deploy/dagster.yaml says."""
    profile = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    values = yaml.safe_load((REPO / "deploy" / "kubernetes" / "values.yaml").read_text())
    runs, pools = profile["concurrency"]["runs"], profile["concurrency"]["pools"]
    assert values["concurrency"] == {
        "runs": {
            "maxConcurrentRuns": runs["max_concurrent_runs"],
            "tagConcurrencyLimits": runs["tag_concurrency_limits"],
        },
        "pools": {"defaultLimit": pools["default_limit"], "granularity": pools["granularity"]},
    }
    daemon = values["dagsterDaemon"]
    assert (
        daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"]
        == (profile["run_monitoring"]["free_slots_after_run_end_seconds"])
    )
    assert daemon["runRetries"] == {"enabled": True, "maxRetries": 1}
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    # The ledger URL and the token reach the code server and every run pod from a secret.
    [deployment] = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    for holder in (deployment, launcher):
        assert holder["envSecrets"] == [{"name": "flux2-secrets"}]
    assert (
        "--from-literal=FLUX2_LEDGER_URL="
        in (REPO / "deploy" / "kubernetes" / "values.yaml").read_text()
    )
