"""Killing a part of `flux2-pipeline materialize` stops the paying, and fails no more than it must.

The command runs its Dagster runs in worker processes forked from a worker server. These
tests kill, with SIGKILL (what the OOM killer and a CI timeout send), the command itself,
its worker server, or one worker, and count with the emulator's own counters
(`GET /_emulator/stats`) the jobs created after the kill, and with psutil which of the
command's processes live on. A stopped `flux2-pipeline ui` (SIGTERM, SIGINT ignored as in
a script) leaves none of its processes behind either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from flux2_pipeline.cli.runs import RUN_TAG
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger
from tests.helpers.cli import BIN, CLI, cli_env, serves
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.net import free_port
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

PARTITIONS = [f"p{index:02d}" for index in range(10)]
ROWS = 4
PER_RUN = 2  # five runs of two partitions
PARALLEL = 2
MAX_CONCURRENCY = 2
ON_ITS_WAY = MAX_CONCURRENCY * PARALLEL
"""The most jobs the command can have sent, unanswered, at the moment of a kill."""
SETTLE_S = 4.0
"""How long after the kill the counters are watched (two job lengths)."""


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    # 1.5 s jobs, none queued: a worker pays for two at a time, all run long.
    config = EmulatorConfig(port=0, latency=1.5, max_concurrent=32, token=TEST_TOKEN, seed=5)
    with EmulatorServer(config) as server:
        yield server


def jobs_created(emulator: EmulatorServer) -> int:
    stats = httpx.get(
        f"{emulator.base_url}/_emulator/stats",
        headers={"Authorization": f"Bearer {TEST_TOKEN}"},
        timeout=10,
    ).json()
    return int(stats["jobs_created"])


def backfill(tmp_path: Path, emulator: EmulatorServer) -> dict[str, str]:
    env = cli_env(
        tmp_path,
        emulator.base_url,
        FLUX2_MAX_CONCURRENCY=str(MAX_CONCURRENCY),
        FLUX2_PARTITIONS_PER_RUN=str(PER_RUN),
        FLUX2_PARALLEL_PARTITIONS=str(PARALLEL),
    )
    for name in PARTITIONS:
        write_table(tmp_path / "prompts", name, prompt_rows(emulator.base_url, name, ROWS))
    return env


def alive(process: psutil.Process) -> bool:
    """Running, and not a zombie waiting for its reaper."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def workers_of(command: subprocess.Popen[str]) -> list[psutil.Process]:
    """The worker processes: children of the command's children (the worker server)."""
    server = worker_server(command)
    return [child for child in server.children() if alive(child)] if server else []


def worker_server(command: subprocess.Popen[str]) -> psutil.Process | None:
    for child in psutil.Process(command.pid).children():
        if "forkserver" in " ".join(child.cmdline()):
            return child
    return None


def start(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`flux2-pipeline materialize --select flux2_edits`, its output to files in tmp_path.

    Not pipes: a worker that outlives the command would hold them open.
    """
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        return subprocess.Popen(
            [CLI, "materialize", "--select", "flux2_edits"], env=env, stdout=out, stderr=err
        )


def output(tmp_path: Path) -> tuple[str, str]:
    return (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


def finish(command: subprocess.Popen[str], family: list[psutil.Process]) -> None:
    """Kill the command and whatever of its processes lives on (never leave one paying)."""
    if command.poll() is None:
        command.kill()
    for process in family:
        if alive(process):
            process.kill()
    command.wait(timeout=30)


def seconds_until_gone(
    processes: list[psutil.Process], since: float, timeout: float
) -> float | None:
    """Seconds from `since` until none of `processes` is alive; None if some outlive `timeout`."""
    while any(alive(process) for process in processes):
        if time.monotonic() > since + timeout:
            return None
        time.sleep(0.05)
    return time.monotonic() - since


def running_partitions(
    emulator: EmulatorServer, command: subprocess.Popen[str]
) -> Callable[[], bool]:
    """Both workers have their run going and have paid for jobs."""

    def ready() -> bool:
        counters = emulator.state.counters
        return len(workers_of(command)) == PARALLEL and counters.jobs_created >= ON_ITS_WAY

    return ready


def test_sigkill_of_the_command_stops_its_workers_paying(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    command = start(tmp_path, backfill(tmp_path, emulator))
    family: list[psutil.Process] = []
    try:
        wait_until(running_partitions(emulator, command))
        family += psutil.Process(command.pid).children(recursive=True)
        command.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        at_kill = jobs_created(emulator)
        command.wait(timeout=30)
        lived = seconds_until_gone(family, killed, timeout=20)
        time.sleep(max(0.0, SETTLE_S - (time.monotonic() - killed)))
        after = jobs_created(emulator) - at_kill
    finally:
        finish(command, family)
    print(f"jobs at the kill {at_kill}, after it {after}; processes gone {lived} s after")
    assert after <= ON_ITS_WAY
    # Every worker stopped its run cleanly or gave up after worker.ORPHAN_GRACE_S (10 s).
    assert lived is not None and lived < 12
    # The 2 x 4 jobs of the runs never started were never paid for.
    assert jobs_created(emulator) < len(PARTITIONS) * ROWS


def test_sigkill_of_the_worker_server_stops_the_runs_and_the_command_outlives_them(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    command = start(tmp_path, backfill(tmp_path, emulator))
    workers: list[psutil.Process] = []
    try:
        wait_until(running_partitions(emulator, command))
        server = worker_server(command)
        assert server is not None
        workers += workers_of(command)
        server.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        at_kill = jobs_created(emulator)
        command.wait(timeout=60)
        ended = time.monotonic()
        workers_alive_at_exit = [worker.pid for worker in workers if alive(worker)]
        time.sleep(max(0.0, SETTLE_S - (time.monotonic() - killed)))
        after = jobs_created(emulator) - at_kill
    finally:
        finish(command, workers)
    stdout, stderr = output(tmp_path)
    print(
        f"jobs at the kill {at_kill}, after it {after}; command ended {ended - killed:.2f} s after"
    )
    assert after <= ON_ITS_WAY
    assert workers_alive_at_exit == []  # the command waited for its workers
    assert command.returncode == 1, stdout + stderr
    assert "BrokenProcessPool" not in stdout + stderr
    assert "the worker server died" in stderr
    # The two running runs stopped (their figures are their own); the three others never
    # started, and say so.
    errors = [line.split(": ", 1) for line in stdout.splitlines() if ": " in line]
    lines = {key: text for key, text in errors if key in PARTITIONS}
    stopped = [key for key, text in lines.items() if "the run was stopped" in text]
    not_started = [key for key, text in lines.items() if "the worker server died" in text]
    assert len(stopped) == PER_RUN * PARALLEL, stdout
    assert len(not_started) == len(PARTITIONS) - PER_RUN * PARALLEL, stdout
    assert "stopped: the remaining partitions were not started" in stdout


def test_a_dead_worker_fails_its_own_run_alone(tmp_path: Path, emulator: EmulatorServer) -> None:
    env = backfill(tmp_path, emulator)
    command = start(tmp_path, env)
    workers: list[psutil.Process] = []
    try:
        wait_until(running_partitions(emulator, command))
        workers += workers_of(command)
        workers[0].send_signal(signal.SIGKILL)
        command.wait(timeout=120)
    finally:
        finish(command, workers)
    stdout, stderr = output(tmp_path)
    assert command.returncode == 1, stdout + stderr
    failed = sorted(
        line.split(":")[0] for line in stdout.splitlines() if "killed by SIGKILL" in line
    )
    # The dead worker's run: one range of two partitions, contiguous in their order.
    assert len(failed) == PER_RUN, stdout + stderr
    first = PARTITIONS.index(failed[0])
    assert first % PER_RUN == 0 and failed == PARTITIONS[first : first + PER_RUN]
    table = [line.split() for line in stdout.splitlines()]
    results = {row[0]: row for row in table if row and row[0] in PARTITIONS}
    assert {key for key, row in results.items() if row[-1] == "ok"} == set(PARTITIONS) - set(failed)
    with Ledger.open(tmp_path / "output" / "ledger.sqlite") as ledger:
        for key in set(PARTITIONS) - set(failed):
            assert ledger.stats(key)["completed"] == ROWS
        # The dead run's rows finished before the kill are reported, as the ledger has them.
        for key in failed:
            assert results[key][1] == results[key][2] == str(ledger.stats(key)["completed"])
    # The dead worker's run is marked failed, not left running in the UI.
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        statuses = [
            run.status
            for run in instance.get_runs(RunsFilter(tags={RUN_TAG: "flux2-pipeline materialize"}))
        ]
    finally:
        instance.dispose()
    runs = len(PARTITIONS) // PER_RUN
    assert Counter(statuses) == {DagsterRunStatus.FAILURE: 1, DagsterRunStatus.SUCCESS: runs - 1}


def test_the_ui_started_from_a_script_stops_on_sigterm_within_5_s(tmp_path: Path) -> None:
    port, emulator_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_"))}
    env.pop("DAGSTER_HOME", None)
    command = [str(BIN / "flux2-pipeline"), "ui", "--workdir", str(tmp_path / "demo")]
    command += ["--port", str(port), "--emulator-port", str(emulator_port)]
    family: list[psutil.Process] = []
    ui = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A script's background job: the shell has SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        url = f"http://127.0.0.1:{port}/server_info"
        wait_until(lambda: serves(url, ui), url, timeout=240, interval=0.5)
        # dagster dev, its code server, webserver and daemon (the last two start late).
        wait_until(lambda: len(psutil.Process(ui.pid).children(recursive=True)) >= 4)
        family += psutil.Process(ui.pid).children(recursive=True)
        ui.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        exited = ui.wait(timeout=30)
        seconds = time.monotonic() - stopped
        left = [" ".join(process.cmdline()[:4]) for process in family if alive(process)]
    finally:
        ui.kill()
        for process in family:
            if alive(process):
                process.kill()
    print(f"ui exited {exited} {seconds:.2f} s after SIGTERM; left: {left}")
    assert exited == 0
    assert seconds < 5
    assert left == []
