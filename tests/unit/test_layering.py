"""The Dagster-free layers stay Dagster-free: usable from a plain script."""

from __future__ import annotations

import subprocess
import sys

import pytest

DAGSTER_FREE = [
    "flux2_pipeline.runcomfy",
    "flux2_pipeline.ledger",
    "flux2_pipeline.batch",
    "flux2_pipeline.media",
    "flux2_pipeline.dataset",
    "flux2_pipeline.paths",
    "flux2_pipeline.emulator",
]


@pytest.mark.parametrize("module", DAGSTER_FREE)
def test_module_imports_without_dagster(module: str) -> None:
    probe = (
        f"import {module}, sys; "
        "leaked = sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')); "
        "print(leaked[:3]); raise SystemExit(1 if leaked else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{module} imports Dagster: {result.stdout}{result.stderr}"
