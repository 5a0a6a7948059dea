"""The `flux2-pipeline` command as a real process, and what its runs recorded.

Example:
    >>> env = cli_env(tmp_path, emulator.base_url, FLUX2_CLAIM_LEASE_SECONDS="3")
    >>> process = start_cli(env, "--partition", "cats")
    >>> last_metadata(env)["flux2/rows"]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from dagster import AssetKey, DagsterInstance

from tests.helpers.emulator import TEST_TOKEN

BIN = Path(sys.executable).parent
CLI = str(BIN / "flux2-pipeline")


def cli_env(tmp_path: Path, base_url: str, **extra: str) -> dict[str, str]:
    """The environment of a CLI process: the emulator, folders in `tmp_path`, a Dagster home."""
    home = tmp_path / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_"))}
    env.update(
        RUNCOMFY_BASE_URL=base_url,
        RUNCOMFY_API_TOKEN=TEST_TOKEN,
        FLUX2_INPUT_DIR=str(tmp_path / "prompts"),
        FLUX2_OUTPUT_DIR=str(tmp_path / "output"),
        FLUX2_MAX_CONCURRENCY="8",
        FLUX2_STEP_RETRIES="0",
        DAGSTER_HOME=str(home),
    )
    env.update(extra)
    return env


def start_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`flux2-pipeline materialize *args` started in the background, its output piped."""
    return subprocess.Popen(
        [CLI, "materialize", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def last_metadata(env: dict[str, str]) -> dict[str, object]:
    """The metadata of the latest `flux2_edits` materialization in the CLI's Dagster home."""
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        event = instance.get_latest_materialization_event(AssetKey("flux2_edits"))
        assert event is not None and event.asset_materialization is not None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}
    finally:
        instance.dispose()


def serves(url: str, process: subprocess.Popen[bytes]) -> bool:
    """Whether the server `process` started answers `url` yet; fails if the process ended."""
    assert process.poll() is None, f"{process.args!r} exited early"
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
