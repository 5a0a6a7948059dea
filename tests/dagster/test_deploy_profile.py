"""deploy/dagster.yaml works: a PostgreSQL-backed instance materializes a partition."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance
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
        (summary,) = materialize_partitions(settings, instance=instance)
        assert summary.succeeded and summary.completed == 4
        assert instance.get_dynamic_partitions("flux2_prompt_tables") == ["prod"]
        # One run for the partition (edits, images), one for the unpartitioned dataset.
        assert len(instance.get_run_records()) == 2
    finally:
        instance.dispose()
