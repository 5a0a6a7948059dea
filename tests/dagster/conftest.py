"""Fixtures for tests that run the pipeline through a real Dagster instance."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test
from sqlalchemy import create_engine, text

from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import TEST_TOKEN


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as dagster_instance:
        yield dagster_instance


@pytest.fixture
def pipeline_env(
    tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Environment that points the pipeline at the test emulator and tmp folders."""
    env = {
        "RUNCOMFY_BASE_URL": emulator.base_url,
        "RUNCOMFY_API_TOKEN": TEST_TOKEN,
        "FLUX2_INPUT_DIR": str(tmp_path / "prompts"),
        "FLUX2_OUTPUT_DIR": str(tmp_path / "output"),
        "FLUX2_MAX_CONCURRENCY": "16",
        # One step attempt per run, so each test sees exactly the runs it starts.
        "FLUX2_STEP_RETRIES": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FLUX2_LEDGER_URL", raising=False)
    return env


@pytest.fixture
def settings(pipeline_env: dict[str, str]) -> Settings:
    return Settings.from_env()


PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One ledger shared by several CLI processes: a SQLite file in the shared output
    folder (`tmp_path/shared-output`), or a fresh database on the local PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared-output' / 'ledger.sqlite'}"
        return
    name = f"flux2_shared_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - only without the local server
        pytest.skip(f"PostgreSQL is not available: {type(exc).__name__}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
