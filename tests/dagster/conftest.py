"""Fixtures for tests that run the pipeline through a real Dagster instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.environment import point_pipeline_at


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as dagster_instance:
        yield dagster_instance


@pytest.fixture
def pipeline_env(
    tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Environment that points the pipeline at the test emulator and tmp folders."""
    return point_pipeline_at(monkeypatch, tmp_path, emulator)


@pytest.fixture
def settings(pipeline_env: dict[str, str]) -> Settings:
    return Settings.from_env()
