"""`tests/under_load.py`, which proves no test passes by timing luck, on a tiny test file:
rounds stop at the first failure, pytest sees CI=true, and the busy processes (and pytest)
never outlive the runner, whether it finishes, fails or is stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.waiting import wait_until
from tests.under_load import shard_commands

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RUNNER = Path(__file__).resolve().parents[1] / "under_load.py"
BUSY_CODE = "while True: pass"
# The runner passes its environment on: without plugins (dagster's, hypothesis') each inner
# pytest starts in a fraction of a second.
QUICK = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

# Fails in its third round (the count lives in a file beside it); asserts what pytest sees.
COUNTING_TEST = """
import os
from pathlib import Path

def test_counted() -> None:
    counter = Path(__file__).with_name("rounds.txt")
    runs = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(runs))
    assert os.environ["CI"] == "true"
    assert runs != 3, "the third round fails"
"""

SLEEPING_TEST = """
import os
import subprocess
import sys
import time
from pathlib import Path

def test_sleeps() -> None:
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(119)"])
    Path(__file__).with_name("helper.pid").write_text(str(helper.pid))
    Path(__file__).with_name("pytest.pid").write_text(str(os.getpid()))
    time.sleep(120)
"""


def runner(tmp_path: Path, name: str, code: str, *args: str) -> list[str]:
    test_file = tmp_path / name
    test_file.write_text(code)
    pytest_args = f"{test_file} -p no:cacheprovider"
    return [sys.executable, str(RUNNER), "--pytest-args", pytest_args, *args]


def busy_pids(output: str) -> list[int]:
    line = next(line for line in output.splitlines() if "busy processes (pids" in line)
    listed = line.split("(pids ", 1)[1].split(")", 1)[0]
    return [int(pid) for pid in listed.split(", ")]


def alive(pid: int, marker: str) -> bool:
    """True while `pid` is a live process whose command line holds `marker`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return marker in cmdline and state != "Z"


def assert_ended(pids: list[int], marker: str) -> None:
    """Fail if any of `pids` still runs `marker`, after killing it (no leftover spinners)."""
    leftovers = [pid for pid in pids if alive(pid, marker)]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes {leftovers} outlived the runner"


def test_rounds_stop_at_the_first_failure_and_the_busy_processes_end(tmp_path: Path) -> None:
    command = runner(tmp_path, "test_counting.py", COUNTING_TEST, "--rounds", "4")
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=QUICK)
    out = done.stdout
    pids = busy_pids(out)
    assert_ended(pids, BUSY_CODE)
    assert done.returncode == 1, out + done.stderr
    assert "under_load: 2 busy processes" in out
    assert "round 1/4 passed in " in out and "(1 passed in " in out
    assert "round 2/4 passed in " in out
    assert "round 3/4 FAILED (exit 1) in " in out and "(1 failed in " in out
    assert "round 4/4" not in out
    assert "2 of 4 rounds passed in a row" in out
    assert (tmp_path / "rounds.txt").read_text() == "3"
    assert len(pids) == 2


def test_every_round_passing_exits_zero(tmp_path: Path) -> None:
    command = runner(tmp_path, "test_counting.py", COUNTING_TEST, "--rounds", "2", "--busy", "1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=QUICK)
    pids = busy_pids(done.stdout)
    assert_ended(pids, BUSY_CODE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 rounds passed in a row" in done.stdout
    assert len(pids) == 1


def test_sigterm_stops_pytest_what_it_started_and_the_busy_processes(tmp_path: Path) -> None:
    command = runner(tmp_path, "test_sleeping.py", SLEEPING_TEST, "--rounds", "3")
    pid_file = tmp_path / "pytest.pid"
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=QUICK) as child:
        try:
            assert child.stdout is not None
            first = child.stdout.readline()
            # pytest is inside the sleeping test once it wrote its pid.
            wait_until(pid_file.exists, "pytest to reach the test", timeout=120, interval=0.05)
            os.kill(child.pid, signal.SIGTERM)
            assert child.wait(30) == 130
        finally:
            if child.poll() is None:
                child.kill()
    pytest_pid = int(pid_file.read_text())
    try:
        assert_ended(busy_pids(first), BUSY_CODE)
    finally:
        deadline = time.monotonic() + 10  # pytest is the runner's child, reaped by it
        while alive(pytest_pid, "pytest") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_ended([pytest_pid], "pytest")
        # What pytest started (a server, a Celery worker) would outlive it; its group does not.
        deadline = time.monotonic() + 10
        helper_pid = int((tmp_path / "helper.pid").read_text())
        while alive(helper_pid, "sleep(119)") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_ended([helper_pid], "sleep(119)")


# Each waits for the other to have started: it passes only when the two run at once.
MEETING_TEST = """
import os
import time
from pathlib import Path

def test_meets_the_other_shard() -> None:
    here = Path(__file__)
    here.with_suffix(".started").write_text(str(os.getpid()))
    other = here.with_name("{other}.started")
    deadline = time.monotonic() + 60
    while not other.exists():
        assert time.monotonic() < deadline, "the other shard never started"
        time.sleep(0.05)
    assert {fail} == 0
"""


def test_shards_split_the_tests_run_at_once_and_any_failure_fails_the_round(
    tmp_path: Path,
) -> None:
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_a.py").write_text(
        MEETING_TEST.replace("{other}", "test_b").replace("{fail}", "0")
    )
    (tests / "test_b.py").write_text(
        MEETING_TEST.replace("{other}", "test_a").replace("{fail}", "1")
    )
    command = [
        sys.executable,
        str(RUNNER),
        "--rounds",
        "2",
        "--busy",
        "1",
        "--shards",
        "2",
        "--durations",
        str(tmp_path / "none.json"),
        "--pytest-args",
        f"{tests} -p no:cacheprovider",
    ]
    # pytest-split is a plugin: this run keeps plugin autoloading on.
    done = subprocess.run(command, capture_output=True, text=True, timeout=150)
    out = done.stdout
    assert_ended(busy_pids(out), BUSY_CODE)
    assert done.returncode == 1, out + done.stderr
    assert "2 `CI=true pytest -q` processes at once" in out
    assert "under_load: shard 1/2" in out and "under_load: shard 2/2" in out
    assert "round 1/2 FAILED (exit 1)" in out and "1 passed" in out and "1 failed" in out
    assert "round 2/2" not in out
    pids = {(tests / f"test_{name}.started").read_text() for name in "ab"}
    assert len(pids) == 2, "each shard is its own pytest process"


def test_shards_balance_on_the_stored_durations(tmp_path: Path) -> None:
    durations = tmp_path / "durations.json"
    durations.write_text("{}")
    commands = shard_commands(["-x"], 3, durations)
    assert len(commands) == 3
    for group, command in enumerate(commands, start=1):
        assert command[command.index("--group") + 1] == str(group)
        assert command[command.index("--splits") + 1] == "3"
        assert command[command.index("--durations-path") + 1] == str(durations)
        assert command[-1] == "-x"
    assert "--splits" not in shard_commands([], 1, durations)[0]
    assert "--durations-path" not in shard_commands([], 2, tmp_path / "absent")[0]
