"""A ledger that fails its writes while the API's answers arrive costs no duplicate job.

Against the real emulator on loopback and a real SQLite ledger: its write lock held by
another process for longer than the busy timeout, or its disk full. The emulator holds
every submit's answer (`hold_submits`) until the ledger is failing, so the request ids
arrive exactly when they cannot be written. A request id the API gave is never dropped:
the job is polled meanwhile and the row completes once the ledger writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux2_pipeline.batch import EditRunner, RowOutcome, read_input_rows
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.ledger import Ledger, LedgerError, SubmissionState
from flux2_pipeline.runcomfy import AsyncRunComfyClient, PollSchedule
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

ROWS = 6

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


@pytest.fixture
def slow_emulator() -> Iterator[EmulatorServer]:
    """Jobs of 5 s, all running at once: they are still polled while the ledger fails."""
    config = EmulatorConfig(port=0, latency=5.0, max_concurrent=64, token=TEST_TOKEN, seed=5)
    with EmulatorServer(config) as server:
        yield server


async def _run(
    emulator: EmulatorServer, ledger: Ledger, table: Path, **options: Any
) -> list[RowOutcome]:
    async with AsyncRunComfyClient(
        TEST_TOKEN, emulator.base_url, poll=PollSchedule(0.05, 0.2, 0.15)
    ) as client:
        runner = EditRunner(
            client, ledger, partition="p", max_concurrency=ROWS, lease_seconds=1.5, **options
        )
        return [outcome async for outcome in runner.run(read_input_rows(table))]


async def _run_and_rerun(
    emulator: EmulatorServer, ledger: Ledger, table: Path, fault: Any
) -> list[RowOutcome]:
    """A run whose submits are answered while `fault` (an async context) fails the ledger;
    if that run dies, a re-run once the ledger works again (as a user would do)."""
    emulator.state.faults.update(hold_submits=True)
    running = asyncio.ensure_future(_run(emulator, ledger, table))
    try:
        # Every row's intent is committed and its job created; the answers are held.
        await asyncio.to_thread(
            wait_until, lambda: emulator.state.counters.held_submits_now == ROWS, "all held"
        )
        async with fault():
            emulator.state.faults.update(hold_submits=False)
            await asyncio.to_thread(
                wait_until, lambda: emulator.state.counters.held_submits_now == 0, "answered"
            )
            await asyncio.sleep(1.0)  # the request ids meet the failing ledger
        try:
            return await running
        except LedgerError:
            await asyncio.sleep(2.0)  # the dead run's leases run out
            return await _run(emulator, ledger, table)
    finally:
        emulator.state.faults.update(hold_submits=False)
        if not running.done():
            running.cancel()
            with contextlib.suppress(BaseException):
                await running


def _assert_paid_once(emulator: EmulatorServer, ledger: Ledger, outcomes: list[RowOutcome]) -> None:
    counters = emulator.state.counters
    assert [o.status for o in outcomes] == ["completed"] * ROWS, [o.error for o in outcomes]
    assert counters.duplicate_bodies == 0
    assert counters.jobs_created == ROWS
    attempts = ledger.submissions("p")
    assert [a.state for a in attempts] == [SubmissionState.COMPLETED] * ROWS
    assert {a.request_id for a in attempts} == {o.request_id for o in outcomes}


async def test_a_write_lock_held_past_the_busy_timeout_loses_no_request_id(
    tmp_path: Path, slow_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short busy timeout, so the lock outlasts it within a short test (it is 30 s).
    monkeypatch.setattr("flux2_pipeline.ledger.store.SQLITE_BUSY_TIMEOUT_MS", 500)
    table = write_table(tmp_path, "p", prompt_rows(slow_emulator.base_url, "lock", ROWS))
    path = tmp_path / "ledger.sqlite"
    counters = slow_emulator.state.counters
    polls_while_locked: list[int] = []

    @contextlib.asynccontextmanager
    async def lock_held_by_another_process() -> Any:
        with subprocess.Popen(  # a real second connection, in another process
            [sys.executable, "-c", LOCKER, str(path), "3.5"],
            stdout=subprocess.PIPE,
            text=True,
        ) as holder:
            try:
                assert holder.stdout is not None
                assert await asyncio.to_thread(holder.stdout.readline) == "locked\n"
                yield
                before = counters.status_calls
                await asyncio.sleep(1.5)  # the lock is still held, past several busy timeouts
                polls_while_locked.append(counters.status_calls - before)
            finally:
                await asyncio.to_thread(holder.wait, 30)

    with Ledger.open(path) as ledger:
        outcomes = await _run_and_rerun(slow_emulator, ledger, table, lock_held_by_another_process)
        _assert_paid_once(slow_emulator, ledger, outcomes)
    # Polls went on while the ledger waited for its lock: the event loop never froze.
    assert polls_while_locked[0] >= ROWS


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"a small tmpfs (a disk that can be filled) needs mount rights: {exc}")


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.sync()
    return filler


async def test_a_full_disk_loses_no_request_id(
    tmp_path: Path, slow_emulator: EmulatorServer
) -> None:
    table = write_table(tmp_path, "p", prompt_rows(slow_emulator.base_url, "full", ROWS))
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    try:

        @contextlib.asynccontextmanager
        async def disk_full() -> Any:
            filler = _fill(disk)
            try:
                yield
            finally:
                filler.unlink()

        with Ledger.open(disk / "ledger.sqlite") as ledger:
            outcomes = await _run_and_rerun(slow_emulator, ledger, table, disk_full)
            _assert_paid_once(slow_emulator, ledger, outcomes)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_a_run_stopped_while_its_ledger_is_locked_keeps_its_request_ids(
    tmp_path: Path,
    slow_emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("flux2_pipeline.ledger.store.SQLITE_BUSY_TIMEOUT_MS", 300)
    table = write_table(tmp_path, "p", prompt_rows(slow_emulator.base_url, "stop", ROWS))
    path = tmp_path / "ledger.sqlite"
    faults = slow_emulator.state.faults
    with Ledger.open(path) as ledger:
        faults.update(hold_submits=True)
        running = asyncio.ensure_future(_run(slow_emulator, ledger, table, stop_write_grace_s=1.0))
        counters = slow_emulator.state.counters
        await asyncio.to_thread(wait_until, lambda: counters.held_submits_now == ROWS, "all held")
        with subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(path), "60"], stdout=subprocess.PIPE, text=True
        ) as holder:
            assert holder.stdout is not None
            assert await asyncio.to_thread(holder.stdout.readline) == "locked\n"
            faults.update(hold_submits=False)
            await asyncio.to_thread(wait_until, lambda: counters.held_submits_now == 0, "answered")
            await asyncio.sleep(1.0)  # the request ids meet the locked ledger
            running.cancel()  # the user stops the run while the lock is still held
            stopping = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await running
            stopped_in = time.monotonic() - stopping
            holder.kill()
    assert stopped_in < 10  # a clean stop: the writes got their grace, then were kept
    kept = [
        r.getMessage() for r in caplog.records if "could not record request id" in r.getMessage()
    ]
    assert len(kept) == ROWS and all("the next run records it" in m for m in kept)
    spill = Path(f"{path}.unrecorded.jsonl")
    assert len(spill.read_text().splitlines()) == ROWS

    # The jobs run on at the API. The next run records the kept ids, and follows them.
    with Ledger.open(path) as ledger:
        assert not spill.exists()
        assert all(a.request_id is not None for a in ledger.submissions("p"))
        outcomes = await _run(slow_emulator, ledger, table)
        _assert_paid_once(slow_emulator, ledger, outcomes)
