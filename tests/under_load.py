"""The test suite, round after round, beside busy processes: the proof that no test passes by
timing luck (issue 13: five rounds in a row beside two busy processes, on 2 cores).

Starts `--busy` processes that each spin one core (`while True: pass`), then runs
`CI=true pytest -q` (plus `--pytest-args`) `--rounds` times, printing each round's result
and duration. It stops at the first failing round and exits with pytest's code; the busy
processes are killed whatever happens (a failure, Ctrl+C, SIGTERM).

Example::

    python tests/under_load.py --rounds 5                       # what `make test-under-load` runs
    python tests/under_load.py --rounds 2 --pytest-args "tests/unit/test_ids.py"
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

BUSY_CODE = "while True: pass"
SUMMARY = re.compile(r"\b\d+ (passed|failed|errors?|skipped|deselected)\b")


@dataclass(frozen=True)
class Round:
    """One pytest run: its exit code, wall time and pytest's closing line."""

    number: int
    returncode: int
    seconds: float
    summary: str

    @property
    def passed(self) -> bool:
        """True when pytest exited 0."""
        return self.returncode == 0


@contextmanager
def busy_processes(count: int) -> Iterator[list[int]]:
    """`count` processes spinning a core each, killed (and reaped) on the way out."""
    children: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", BUSY_CODE],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield [child.pid for child in children]
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


def pytest_command(extra: Sequence[str]) -> list[str]:
    """The README's `pytest -q`, from this interpreter's environment, plus `extra`."""
    script = Path(sys.executable).with_name("pytest")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "pytest"]
    return [*base, "-q", *extra]


def run_round(number: int, command: Sequence[str]) -> Round:
    """Run pytest once with CI=true, passing its output through; keep its closing line."""
    env = {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1"}
    summary = ""
    started = time.monotonic()
    with subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            for line in child.stdout:
                sys.stdout.write(line)
                if SUMMARY.search(line):
                    summary = line.strip(" =\n")
            returncode = child.wait()
        finally:
            if child.poll() is None:  # interrupted: pytest goes with us
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
    return Round(number, returncode, time.monotonic() - started, summary)


def _stop(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl+C, so every `finally` (the busy processes') runs.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the rounds, return the exit code (0: every round passed)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="pytest runs in a row (default 5)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes (default 2)")
    parser.add_argument(
        "--pytest-args", default="", help='more pytest arguments, one string: "tests/unit -x"'
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.busy < 0:
        parser.error("--rounds must be at least 1 and --busy at least 0")
    signal.signal(signal.SIGTERM, _stop)
    command = pytest_command(shlex.split(args.pytest_args))
    rounds: list[Round] = []
    with busy_processes(args.busy) as pids:
        print(
            f"under_load: {args.busy} busy processes (pids {', '.join(map(str, pids)) or '-'}) "
            f"beside `CI=true {shlex.join(command)}`, {args.rounds} rounds",
            flush=True,
        )
        for number in range(1, args.rounds + 1):
            done = run_round(number, command)
            rounds.append(done)
            verdict = "passed" if done.passed else f"FAILED (exit {done.returncode})"
            print(
                f"under_load: round {number}/{args.rounds} {verdict} in {done.seconds:.1f} s"
                f" ({done.summary or 'no pytest summary'})",
                flush=True,
            )
            if not done.passed:
                break
    passed = sum(r.passed for r in rounds)
    times = ", ".join(f"{r.seconds:.0f}" for r in rounds)
    print(f"under_load: {passed} of {args.rounds} rounds passed in a row (seconds: {times})")
    return 0 if passed == args.rounds else (rounds[-1].returncode or 1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("under_load: interrupted; the busy processes are stopped", file=sys.stderr)
        sys.exit(130)
