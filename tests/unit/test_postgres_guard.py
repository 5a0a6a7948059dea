"""The `postgres` marker's guard: a clear skip on a laptop, a failure under CI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = """
import pytest

@pytest.mark.postgres
def test_needs_the_server():
    pass

def test_plain():
    pass
"""


def run_sample(tmp_path: Path, url: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    postgres: needs it\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["FLUX2_TEST_POSTGRES_URL"] = url
    env["PYTHONPATH"] = str(REPO)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.helpers.postgres",
            "-rs",
            "-q",
            "-p",
            "no:cacheprovider",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def refused_url() -> Iterator[str]:
    # Bound and never listening, for the whole test: connections to it are refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"postgresql://postgres@127.0.0.1:{sock.getsockname()[1]}/test"


def test_unreachable_server_skips_with_the_reason_outside_ci(
    tmp_path: Path, refused_url: str
) -> None:
    result = run_sample(tmp_path, refused_url, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout
    assert "PostgreSQL is not reachable at 127.0.0.1:" in result.stdout


def test_unreachable_server_fails_under_ci(tmp_path: Path, refused_url: str) -> None:
    result = run_sample(tmp_path, refused_url, ci="true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout
    assert "CI=true, so tests marked postgres must run" in result.stdout


def test_ci_run_script_sets_ci() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "export CI=true" in script.split("make test")[0]
