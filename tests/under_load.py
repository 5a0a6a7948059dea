"""The test suite, round after round, beside busy processes: the proof that no test passes by
timing luck (five rounds in a row beside two busy processes, on 2 cores).

Starts `--busy` processes that each spin one core (`while True: pass`), then runs
`CI=true pytest -q` (plus `--pytest-args`) `--rounds` times, printing each round's result
and duration; with `--shards N` each round is N such processes at once, each running a
share of the tests chosen by pytest-split (balanced on `tests/.test_durations`). It stops
at the first failing round and exits with pytest's code; the busy processes, and each
pytest's process group, are ended whatever happens (a failure, Ctrl+C, SIGTERM).

Example::

    python tests/under_load.py --rounds 5                       # what `make test-under-load` runs
    python tests/under_load.py --rounds 5 --shards 2            # each round as 2 pytest processes
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
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

BUSY_CODE = "while True: pass"
DURATIONS = Path(__file__).resolve().parent / ".test_durations"
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


def described(commands: Sequence[Sequence[str]]) -> str:
    """`CI=true pytest -q ...`, or how many such commands split the tests."""
    if len(commands) == 1:
        return f"`CI=true {shlex.join(commands[0])}`"
    return f"{len(commands)} `CI=true pytest -q` processes at once, splitting the tests"


def pytest_command(extra: Sequence[str]) -> list[str]:
    """The README's `pytest -q`, from this interpreter's environment, plus `extra`."""
    script = Path(sys.executable).with_name("pytest")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "pytest"]
    return [*base, "-q", *extra]


def shard_commands(extra: Sequence[str], shards: int, durations: Path) -> list[list[str]]:
    """One pytest command, or `shards` of them splitting the suite's tests (pytest-split).

    Every test still runs once a round; the shards run at once, so the suite also loads
    itself. pytest-split balances the groups by the test durations stored in `durations`
    (`make test-durations` refreshes them), or by the count of tests when there are none.
    """
    if shards == 1:
        return [pytest_command(extra)]
    split = ["--splits", str(shards), "--splitting-algorithm", "least_duration"]
    if durations.exists():
        split += ["--durations-path", str(durations)]
    return [
        pytest_command([*split, "--group", str(group), *extra]) for group in range(1, shards + 1)
    ]


def run_round(number: int, commands: Sequence[Sequence[str]]) -> Round:
    """Run the pytest commands at once with CI=true; the round fails if any of them fails.

    One command's output passes through as it comes; several commands' outputs are kept
    apart and written out one after another, each as its command ends.
    """
    env = {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with ExitStack() as stack:
        outputs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]
        children = [
            stack.enter_context(
                subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if len(commands) == 1 else output,
                    stderr=None if len(commands) == 1 else subprocess.STDOUT,
                    text=True,
                    # Its own process group: what it starts (servers, Celery workers) ends with it.
                    start_new_session=True,
                )
            )
            for command, output in zip(commands, outputs, strict=True)
        ]
        summaries = [""] * len(children)
        try:
            if len(children) == 1:
                summaries[0] = _pass_through(children[0])
            for index, child in enumerate(children):
                child.wait()
                if len(children) > 1:
                    summaries[index] = _write_out(index, len(children), outputs[index])
        finally:
            for child in children:
                _end(child)
    codes = [child.returncode for child in children]
    returncode = next((code for code in codes if code != 0), 0)
    summary = "; ".join(text for text in summaries if text)
    return Round(number, returncode, time.monotonic() - started, summary)


def _pass_through(child: subprocess.Popen[str]) -> str:
    """Copy the child's output to ours as it comes; return pytest's closing line."""
    summary = ""
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(line)
        if SUMMARY.search(line):
            summary = line.strip(" =\n")
    return summary


def _write_out(index: int, shards: int, output: IO[str]) -> str:
    """Write a finished shard's output to ours under a header; return its closing line."""
    output.seek(0)
    text = output.read()
    sys.stdout.write(f"under_load: shard {index + 1}/{shards}\n{text}")
    sys.stdout.flush()
    closing = [line.strip(" =") for line in text.splitlines() if SUMMARY.search(line)]
    return closing[-1] if closing else ""


def _end(child: subprocess.Popen[str]) -> None:
    """An interrupted round's pytest goes with us, and so does anything it started that is
    still running (a Celery worker, a server): its whole process group, SIGTERM then SIGKILL."""
    for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if _ended(child):
            return
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signum)
        deadline = time.monotonic() + grace
        while not _ended(child) and time.monotonic() < deadline:
            time.sleep(0.05)
    child.wait()


def _ended(child: subprocess.Popen[str]) -> bool:
    """True once pytest has exited (and been reaped) and nothing of its group runs."""
    if child.poll() is None:
        return False
    try:
        os.killpg(child.pid, 0)
    except ProcessLookupError:
        return True
    return False


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
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="pytest processes at once, each running a share of the tests (default 1)",
    )
    parser.add_argument(
        "--durations",
        type=Path,
        default=DURATIONS,
        help=f"the test durations --shards balances on, if present (default {DURATIONS})",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.busy < 0 or args.shards < 1:
        parser.error("--rounds and --shards must be at least 1 and --busy at least 0")
    signal.signal(signal.SIGTERM, _stop)
    commands = shard_commands(shlex.split(args.pytest_args), args.shards, args.durations)
    rounds: list[Round] = []
    with busy_processes(args.busy) as pids:
        print(
            f"under_load: {args.busy} busy processes (pids {', '.join(map(str, pids)) or '-'}) "
            f"beside {described(commands)}, {args.rounds} rounds",
            flush=True,
        )
        for number in range(1, args.rounds + 1):
            done = run_round(number, commands)
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
