"""The pool's worker server, its early start (a cheap guess, made before Dagster is
imported), its start gate and the pipe between the command and a worker.

These start fork-server processes and subprocesses."""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from flux2_pipeline.cli.pool import server
from flux2_pipeline.cli.pool.server import StartGate
from flux2_pipeline.cli.pool.worker import tell_stop, watch_command


@pytest.mark.parametrize("name", [*server.PRELOAD, *server.MODULES])
def test_every_preloaded_module_exists(name: str) -> None:
    # The server skips a name that does not import: a Dagster upgrade that moved one
    # would quietly make every worker import it again after its fork.
    importlib.import_module(name)


def test_the_command_line_starts_the_server_before_importing_dagster() -> None:
    code = "import sys, flux2_pipeline.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'pandas', 'sqlalchemy')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("files", "partitions", "parallel", "environ", "needed"),
    [
        (26, [], None, {}, True),  # two runs of the default 25
        (25, [], None, {}, False),  # one run: the command runs it in its own process
        (26, [], 1, {}, False),  # --parallel 1
        (26, [], None, {"FLUX2_PARALLEL_PARTITIONS": "1"}, False),
        (3, [], None, {"FLUX2_PARTITIONS_PER_RUN": "1"}, True),
        (0, ["a", "b"], None, {"FLUX2_PARTITIONS_PER_RUN": "1"}, True),  # --partition a,b
        (3, [], None, {"FLUX2_PARTITIONS_PER_RUN": "one"}, False),  # Settings will say why
    ],
)
def test_the_server_is_started_early_only_when_several_runs_are_likely(
    tmp_path: Path,
    files: int,
    partitions: list[str],
    parallel: int | None,
    environ: dict[str, str],
    needed: bool,
) -> None:
    for index in range(files):
        (tmp_path / f"p{index}.parquet").touch()
    (tmp_path / "notes.txt").touch()
    environ = {"FLUX2_INPUT_DIR": str(tmp_path), **environ}
    assert server.likely_needed(partitions, parallel, environ) is needed


def test_no_input_folder_means_no_guess(tmp_path: Path) -> None:
    assert not server.likely_needed([], None, {})
    assert not server.likely_needed([], None, {"FLUX2_INPUT_DIR": str(tmp_path / "missing")})


SERVER_THEN_EXIT = """
import multiprocessing, multiprocessing.forkserver
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload({preload!r})
multiprocessing.forkserver.ensure_running()
print("command done", flush=True)
"""

LOUD_TEARDOWN = """
import atexit, sys

def say() -> None:
    print("server teardown ran", flush=True)

if sys.argv[:1] == ["-c"]:
    atexit.register(say)
"""


@pytest.mark.parametrize("quick", [True, False])
def test_the_worker_server_skips_its_teardown_when_the_command_exits(
    tmp_path: Path, quick: bool
) -> None:
    # The server holds the command's stdout: its teardown (0.6 s once Dagster is loaded)
    # kept a reader of the command's output waiting after the command had exited. An exit
    # handler registered before the quick exit stands for that teardown: it runs only
    # without `preload`.
    (tmp_path / "loud_teardown.py").write_text(LOUD_TEARDOWN)
    preload = ["loud_teardown", *(list(server.PRELOAD) if quick else [])]
    script = SERVER_THEN_EXIT.format(preload=preload)
    # The server finds its preloaded modules on PYTHONPATH, not the command's sys.path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    assert "command done" in done.stdout
    assert ("server teardown ran" in done.stdout) is not quick


def test_the_quick_exit_is_only_for_the_server() -> None:
    code = (
        "import atexit, gc, flux2_pipeline.cli.pool.preload; "
        "print(atexit._ncallbacks(), gc.get_freeze_count(), gc.isenabled())"
    )
    baseline = (
        "import atexit, gc, flux2_pipeline.cli.pool.server; "
        "print(atexit._ncallbacks(), gc.get_freeze_count(), gc.isenabled())"
    )
    run = [sys.executable, "-c"]
    with_module = subprocess.run([*run, code], capture_output=True, text=True, check=True)
    without = subprocess.run([*run, baseline], capture_output=True, text=True, check=True)
    # Imported anywhere but the server's preload loop, it changes nothing.
    assert with_module.stdout == without.stdout


def _gate(width: int) -> StartGate:
    return StartGate(multiprocessing.get_context("spawn"), width=width)


def test_the_start_gate_lets_the_next_run_in_when_the_first_passes() -> None:
    gate = _gate(1)
    entered = threading.Event()
    with gate.held() as passed:

        def second() -> None:
            with gate.held():
                entered.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(0.3)  # one place, taken: the second run waits
        passed()
        assert entered.wait(10)  # the first run's step started: the second goes in
        passed()  # a second call (the block's end is a third) gives nothing back twice
    waiter.join()
    # The one place came back, once (a BoundedSemaphore refuses a second release): the
    # next run enters at once instead of waiting out its timeout.
    started = time.monotonic()
    with gate.held(timeout=5):
        assert time.monotonic() - started < 1


def test_a_run_waits_at_most_the_timeout_then_goes_ahead() -> None:
    gate = _gate(1)
    with gate.held():
        started = time.monotonic()
        with gate.held(timeout=0.2) as passed:
            waited = time.monotonic() - started
            passed()  # went ahead without a place: gives none back
    assert waited >= 0.2
    # The run that went ahead gave back no place it had not taken: still one place.
    with gate.held(timeout=0):
        started = time.monotonic()
        with gate.held(timeout=0.1):
            assert time.monotonic() - started >= 0.1


def test_the_gate_is_one_place_per_core_by_default() -> None:
    gate = StartGate(multiprocessing.get_context("spawn"))
    assert gate.width == max(1, os.cpu_count() or 1)


def test_a_stop_ends_the_wait_at_the_gate() -> None:
    gate, stop = _gate(1), threading.Event()
    with gate.held():
        threading.Timer(0.2, stop.set).start()
        started = time.monotonic()
        with gate.held(timeout=60, cancel=stop):
            waited = time.monotonic() - started
    assert 0.2 <= waited < 5


def _collector_state() -> tuple[bool, int, bool]:
    return gc.isenabled(), gc.get_freeze_count(), "flux2_pipeline.cli.pool.worker" in sys.modules


def test_workers_start_with_the_imports_done_frozen_and_the_collector_on() -> None:
    # The server imports `MODULES` with the collector off, then freezes them: a worker
    # forked from it has them loaded, never walks them, and collects its own garbage.
    with ProcessPoolExecutor(1, mp_context=server.start_worker_server()) as pool:
        enabled, frozen, loaded = pool.submit(_collector_state).result(timeout=120)
    assert enabled
    assert loaded
    assert frozen > 100_000  # Dagster and the rest: hundreds of thousands of objects


def test_a_worker_hears_the_command_stop_it_and_stays() -> None:
    mine, theirs = multiprocessing.Pipe()
    stopped, exits = threading.Event(), []
    watcher = watch_command(theirs, stopped.set, grace=0.05, exit_process=exits.append)
    tell_stop(mine)
    assert stopped.wait(5)
    watcher.join(5)
    assert exits == []  # the command waits for its clean stop, however long


def test_a_worker_whose_command_died_stops_then_exits_after_the_grace() -> None:
    mine, theirs = multiprocessing.Pipe()
    stopped, exits = threading.Event(), []
    watcher = watch_command(theirs, stopped.set, grace=0.2, exit_process=exits.append)
    mine.close()  # what the kernel does to every end the command held when it dies
    assert stopped.wait(5)
    assert exits == []  # the grace: time to stop the run cleanly
    watcher.join(5)
    assert exits == [1]
    tell_stop(mine)  # a stop to a worker already gone is no error


def test_the_server_is_alive_until_killed_and_not_reaped_by_asking() -> None:
    import multiprocessing.forkserver as forkserver

    server.start_worker_server()
    forked = forkserver._forkserver  # type: ignore[attr-defined]
    pid = forked._forkserver_pid
    assert server.server_alive()
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while server.server_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.server_alive()
    # Still this process's child to reap: multiprocessing starts a new server on demand.
    server.start_worker_server()
    assert forked._forkserver_pid != pid and server.server_alive()
