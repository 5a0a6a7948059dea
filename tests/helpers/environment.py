"""The environment an in-process pipeline reads its settings from, pointed at test servers.

Example:
    >>> point_pipeline_at(monkeypatch, tmp_path, emulator)["FLUX2_INPUT_DIR"]
    '/tmp/.../prompts'
    >>> settings = Settings.from_env()
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flux2_pipeline.emulator import EmulatorServer
from tests.helpers.emulator import TEST_TOKEN


def point_pipeline_at(
    monkeypatch: pytest.MonkeyPatch, folder: Path, emulator: EmulatorServer
) -> dict[str, str]:
    """Set the environment that points the pipeline at `emulator` and `folder`; return it."""
    env = {
        "RUNCOMFY_BASE_URL": emulator.base_url,
        "RUNCOMFY_API_TOKEN": TEST_TOKEN,
        "FLUX2_INPUT_DIR": str(folder / "prompts"),
        "FLUX2_OUTPUT_DIR": str(folder / "output"),
        "FLUX2_MAX_CONCURRENCY": "16",
        # One step attempt per run, so each test sees exactly the runs it starts.
        "FLUX2_STEP_RETRIES": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FLUX2_LEDGER_URL", raising=False)
    return env
