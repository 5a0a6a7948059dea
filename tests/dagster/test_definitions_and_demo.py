"""The workspace loads in Dagster's own tooling, and the README's first command works."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers.cli import BIN

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_"))}
    env.update(extra)
    return env


def test_dagster_validates_the_workspace(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=clean_env(DAGSTER_HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr


def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [str(BIN / "flux2-pipeline"), "demo", "--workdir", str(workdir)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for partition in ("city-at-night", "product-shots", "style-transfer"):
        assert partition in result.stdout
        rows = pq.read_table(workdir / "output" / "flux2_edits" / f"{partition}.parquet")
        statuses = set(rows["status"].to_pylist())
        assert statuses <= {"completed", "invalid"} and "completed" in statuses
    previews = sorted((workdir / "previews").iterdir())
    assert len(previews) == 3
    for preview in previews:
        with Image.open(preview) as image:
            image.verify()
    # Running it again starts afresh in the same folder.
    again = subprocess.run(
        [str(BIN / "flux2-pipeline"), "demo", "--workdir", str(workdir)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr


def test_the_demo_refuses_to_wipe_a_folder_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    result = subprocess.run(
        [str(BIN / "flux2-pipeline"), "demo", "--workdir", str(precious)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "was not made by the demo" in result.stderr
    assert (precious / "thesis.txt").read_text() == "do not delete"
