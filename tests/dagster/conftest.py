"""Fixtures for tests that run the pipeline through a real Dagster instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

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
