"""Every benchmark runs end to end at tiny sizes (`--smoke`) and prints its figures.

Nothing here asserts timing: the figures live in README.md, "Benchmarks".
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
    "memory": ("### memory", "peak RSS MB", "re-run:"),
    "partitions": ("### partitions", "s/partition", "single_run()"),
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
