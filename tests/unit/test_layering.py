"""The Dagster-free layers stay Dagster-free: usable from a plain script."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import flux2_pipeline.net

DAGSTER_FREE = [
    "flux2_pipeline.runcomfy",
    "flux2_pipeline.ledger",
    "flux2_pipeline.batch",
    "flux2_pipeline.media",
    "flux2_pipeline.dataset",
    "flux2_pipeline.paths",
    "flux2_pipeline.net",
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


def test_net_imports_only_the_stdlib_httpx_and_the_retry_policy() -> None:
    allowed = {"httpx", "flux2_pipeline.runcomfy.retry"}
    package = Path(flux2_pipeline.net.__file__).parent
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name.startswith("flux2_pipeline.net") or top in sys.stdlib_module_names:
                    continue
                assert name in allowed, f"{source.name} imports {name}"
