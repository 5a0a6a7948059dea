"""Every benchmark runs end to end at tiny sizes (`--smoke`) and prints its figures.

Nothing here asserts timing: the figures live in benchmarks/README.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
EXPECTED = {
    "throughput": ("### throughput", "| plain ", "| client ", "| pipeline-net "),
    "transport": ("### transport", "| httpx ", "| aiohttp "),
    "polling": ("### polling", "| plain 3 s ", "| remote ", "| loopback "),
    "memory": ("### memory", "peak RSS MB", "re-run:"),
    "photos": ("### photos", "peak RSS MB", "largest peak RSS"),
    "partitions": ("### partitions", "s/partition", "single_run()"),
    "backfill": ("### backfill", "| plain ", "| --parallel 4, 25/run "),
    "load": ("### load", "| no DAGSTER_HOME (baseline) ", "| later (nothing new) "),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_smoke(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for text in EXPECTED[name]:
        assert text in done.stdout, done.stdout


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_help(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "--smoke" in done.stdout


@pytest.mark.timeout(180)
def test_soak_smoke() -> None:
    """300 rows, 3 SIGKILLs under 429s, 5xx and failed jobs, re-run until done: every
    check of the soak holds (no row lost, duplicates within the unknown window)."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "soak.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for text in ("### soak", "rows lost: 0 (target 0): met", "kills: 3 of 3", "duplicates: "):
        assert text in done.stdout, done.stdout
    assert "NOT met" not in done.stdout, done.stdout
