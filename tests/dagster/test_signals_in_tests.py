"""The test processes keep SIGTERM deliverable whatever they were started with: Dagster's
in-process runs copy SIGINT's handler to SIGTERM, so a pytest started ignoring SIGINT (in the
background, from a script) would ignore SIGTERM after its first run, and so would every
process it spawned; a pool's `terminate()` then hung for ever (`tests/helpers/signals.py`)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import asset, materialize

from tests.helpers.signals import keep_sigterm_deliverable


@asset
def trivial() -> int:
    return 1


@pytest.fixture
def started_ignoring_sigint() -> Iterator[None]:
    """SIGINT and SIGTERM as in a pytest started in the background; restored afterwards."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def sigterm_ends_a_child() -> bool:
    """Whether a process spawned now dies of SIGTERM (it inherits an ignored signal)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ignored = int(_status_field(child.pid, "SigIgn"), 16)
        if ignored & (1 << (signal.SIGTERM - 1)):
            return False
        child.send_signal(signal.SIGTERM)
        return child.wait(60) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split()[1]
    raise LookupError(name)


@pytest.mark.usefixtures("started_ignoring_sigint")
def test_a_dagster_run_leaves_sigterm_ignored_when_sigint_was() -> None:
    assert materialize([trivial]).success

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert not sigterm_ends_a_child()


@pytest.mark.usefixtures("started_ignoring_sigint")
def test_the_test_processes_keep_sigterm_deliverable_through_dagster_runs() -> None:
    keep_sigterm_deliverable()  # what tests/conftest.py does when pytest starts

    assert materialize([trivial]).success

    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    assert sigterm_ends_a_child()
