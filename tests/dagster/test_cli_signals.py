"""A command started in the background from a script can still be stopped between runs.

Such a command starts with SIGINT ignored (the shell does that), and each Dagster run
copies SIGINT's handler to SIGTERM as it ends; `run_backfill` puts SIGTERM back after
each of its runs (`sigterm_kept`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.cli import cli_env
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

pytestmark = pytest.mark.slow


@pytest.fixture
def sigint_ignored() -> Iterator[None]:
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


@pytest.mark.usefixtures("sigint_ignored", "pipeline_env")
def test_each_run_leaves_sigterm_as_it_found_it(
    emulator: EmulatorServer, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUX2_PARTITIONS_PER_RUN", "1")
    settings = Settings.from_env()
    for name in ("one", "two"):
        write_table(Path(settings.storage.input_dir), name, prompt_rows(emulator.base_url, name, 2))
    report = run_backfill(settings, instance=instance, parallel=1)  # 2 runs, then the dataset's
    assert report.succeeded and len(report.partitions) == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the shell's choice stands


def test_a_command_started_ignoring_sigint_dies_of_sigterm_after_its_runs(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    # The command's last act is to stop and wait for SIGTERM: after three Dagster runs.
    env = cli_env(tmp_path, emulator.base_url, FLUX2_PARTITIONS_PER_RUN="1")
    for name in ("one", "two"):
        write_table(Path(env["FLUX2_INPUT_DIR"]), name, prompt_rows(emulator.base_url, name, 2))
    script = (
        "import os, signal, sys\n"
        "from flux2_pipeline import cli\n"
        "try:\n"
        "    cli.main(['materialize', '--parallel', '1'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print('ran', flush=True)\n"
        "signal.pause()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    ) as command:
        try:
            assert command.stdout is not None and command.stderr is not None
            for line in command.stdout:
                if line.strip() == "ran":
                    break
            else:
                raise AssertionError(f"the command ended: {command.wait()} {command.stderr.read()}")
            command.send_signal(signal.SIGTERM)
            assert command.wait(30) == -signal.SIGTERM
        finally:
            command.kill()
