"""Backfill: many partitions against a server that runs C jobs at once, vs a plain script.

For each scenario `PxR:L:C` (P partitions of R rows, jobs of latency L, a server running
C jobs at once and queueing the rest): (a) the plain aiohttp script of `throughput.py`
doing all P*R jobs C at a time, in this process; (b) `flux2-pipeline materialize --select
flux2_edits` over the P fresh partitions (Dagster's start included), with
`FLUX2_MAX_CONCURRENCY` = C, at each `--parallel` value (Dagster runs at once) and each
`--per-run` value (FLUX2_PARTITIONS_PER_RUN: 1 = one run per partition, the old
behaviour; 25 = the default ranges). Wall is the command's; CPU is summed over the command and
every process it started (sampled from /proc, so the worker processes count); "peak
server" is the most jobs the server ever ran at once, "peak queued" the most that waited.

    python benchmarks/backfill.py                           # the two default scenarios
    python benchmarks/backfill.py --scenario 8x40:1:32 --parallel 1 --per-run 1 --per-run 25
    python benchmarks/backfill.py --scenario 8x40:1:32 --parallel 8 --account-cap
    python benchmarks/backfill.py --per-run 25 --postgres   # + instance and ledger on PostgreSQL

With `--existing-instance`, each command finds its Dagster instance already made, as a
team's second command does: one `materialize` of the still-empty input folder
runs first, untimed. Without it, each command creates them (Dagster's schema migrations).
With `--postgres`, each mode also runs with the Dagster instance's storage and the ledger
in a fresh database of the local PostgreSQL server (`--postgres-admin`), as the deploy
profile has them; the default instance is SQLite files in DAGSTER_HOME, where each event
is a commit of its own.
    python benchmarks/backfill.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Emulator,
    cli_command,
    emulator,
    ideal_seconds,
    pipeline_env,
    print_table,
    write_prompt_table_in_child,
)
from throughput import body, plain_aiohttp

SCENARIOS = ("8x40:1:32", "100x20:0.5:64")
SMOKE_SCENARIO = "3x4:0.2:4"
DEFAULT_PARALLEL = (4,)
DEFAULT_PER_RUN = (1, 25)
PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def scenario(text: str) -> tuple[int, int, float, int]:
    """`PxR:L:C` -> (partitions, rows, latency, concurrency)."""
    try:
        shape, latency, concurrency = text.split(":")
        partitions, rows = shape.split("x")
        return int(partitions), int(rows), float(latency), int(concurrency)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PxR:L:C like 8x40:1:32, got {text!r}") from None


class TreeCpu:
    """CPU seconds of a process and all its descendants, sampled every 50 ms.

    `wait4` counts only the child (and the children it reaps itself); the command's workers
    are forked by a separate server process, so they are sampled here instead. A process's
    last sample stands for its total: at most 50 ms of a short-lived process is missed.
    """

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                processes = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                self._seen[process.pid] = times.user + times.system

    def total(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self._seen.values())


def run_command(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    cpu = TreeCpu(process.pid)
    out, err = process.communicate()
    wall = time.perf_counter() - started
    total = cpu.total()
    if process.returncode != 0:
        raise SystemExit(f"materialize failed ({process.returncode}):\n{out[-2000:]}{err[-3000:]}")
    return wall, total, out


@contextmanager
def postgres_database(admin_url: str | None) -> Iterator[str | None]:
    """A fresh database on the server of `admin_url` (its URL), dropped after; None: none."""
    if admin_url is None:
        yield None
        return
    from sqlalchemy import create_engine, text

    name = f"flux2_backfill_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def measure(
    emu: Emulator,
    partitions: int,
    rows: int,
    concurrency: int,
    parallel: int,
    per_run: int,
    verbose: bool,
    account_cap: bool,
    postgres_admin: str | None = None,
    existing_instance: bool = False,
) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="flux2-backfill-") as tmp,
        postgres_database(postgres_admin) as database,
    ):
        workdir = Path(tmp)
        (workdir / "input").mkdir()
        extra = {"FLUX2_PARTITIONS_PER_RUN": str(per_run)}
        if account_cap:
            extra["FLUX2_ACCOUNT_CONCURRENCY"] = str(concurrency)
        if database is not None:
            extra["FLUX2_LEDGER_URL"] = database
        env = pipeline_env(emu, workdir, concurrency, extra)
        if database is not None:
            (workdir / "dagster_home" / "dagster.yaml").write_text(
                "telemetry:\n  enabled: false\n"
                f"storage:\n  postgres:\n    postgres_url: {database}\n"
            )
        command = [
            *cli_command(),
            "materialize",
            "--select",
            "flux2_edits",
            "--parallel",
            str(parallel),
        ]
        if existing_instance:
            run_command(command, env)  # nothing to materialize yet: makes the instance
        for index in range(partitions):
            write_prompt_table_in_child(
                workdir / "input" / f"part-{index:04d}.parquet",
                rows,
                emu.base_url,
                row_group_rows=rows,
            )
        emu.reset()
        emu_cpu = emu.cpu_seconds()
        wall, cpu, out = run_command(command, env)
        done = out.count(" ok")
        if done != partitions:
            raise SystemExit(f"{done} of {partitions} partitions succeeded:\n{out[-2000:]}")
        if verbose:
            print(out, flush=True)
        return {"wall": wall, "cpu": cpu, "emu_cpu": emu.cpu_seconds() - emu_cpu, **_peaks(emu)}


def measure_plain(emu: Emulator, jobs: int, concurrency: int) -> dict[str, float]:
    bodies = [body(emu, i) for i in range(jobs)]
    emu.reset()
    emu_cpu = emu.cpu_seconds()
    wall, cpu = time.perf_counter(), time.process_time()
    completed = asyncio.run(plain_aiohttp(emu.base_url, bodies, concurrency))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if completed != jobs:
        raise SystemExit(f"only {completed} of {jobs} jobs completed")
    return {"wall": wall, "cpu": cpu, "emu_cpu": emu.cpu_seconds() - emu_cpu, **_peaks(emu)}


def _peaks(emu: Emulator) -> dict[str, float]:
    stats = emu.stats()
    return {
        "peak_server": float(stats["max_in_progress"]),
        "peak_queued": float(stats.get("max_queue_length", 0)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--scenario", type=scenario, action="append", help=f"PxR:L:C, repeatable ({SCENARIOS})"
    )
    parser.add_argument(
        "--parallel", type=int, action="append", help=f"--parallel values {DEFAULT_PARALLEL}"
    )
    parser.add_argument(
        "--per-run", type=int, action="append", help=f"FLUX2_PARTITIONS_PER_RUN {DEFAULT_PER_RUN}"
    )
    parser.add_argument("--smoke", action="store_true", help=f"tiny: {SMOKE_SCENARIO}")
    parser.add_argument("--verbose", action="store_true", help="print each command's report")
    parser.add_argument(
        "--account-cap",
        action="store_true",
        help="also run each --parallel value with FLUX2_ACCOUNT_CONCURRENCY = C",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also run each mode with the instance and the ledger on PostgreSQL",
    )
    parser.add_argument(
        "--postgres-admin",
        default=PG_ADMIN,
        help=f"a URL that may create databases (default {PG_ADMIN})",
    )
    parser.add_argument(
        "--existing-instance",
        action="store_true",
        help="make each command's Dagster instance first, untimed (a team's second command)",
    )
    args = parser.parse_args(argv)
    scenarios = args.scenario or [
        scenario(text) for text in ((SMOKE_SCENARIO,) if args.smoke else SCENARIOS)
    ]
    parallels = args.parallel or list(DEFAULT_PARALLEL)
    # The smoke run (CI) checks the default ranges only: one run of the command, not two.
    per_runs = args.per_run or ([25] if args.smoke else list(DEFAULT_PER_RUN))
    table: list[dict[str, Any]] = []
    for partitions, rows, latency, concurrency in scenarios:
        name = f"{partitions}x{rows}:{latency:g}:{concurrency}"
        ideal = ideal_seconds(partitions * rows, latency, concurrency)
        with emulator(latency, max_concurrent=concurrency) as emu:
            results = [("plain", measure_plain(emu, partitions * rows, concurrency))]
            modes = [
                (parallel, per_run, capped, postgres)
                for parallel in parallels
                for per_run in per_runs
                for capped in ((False, True) if args.account_cap else (False,))
                for postgres in ((False, True) if args.postgres else (False,))
            ]
            for parallel, per_run, capped, postgres in modes:
                figures = measure(
                    emu,
                    partitions,
                    rows,
                    concurrency,
                    parallel,
                    per_run,
                    args.verbose,
                    capped,
                    args.postgres_admin if postgres else None,
                    args.existing_instance,
                )
                mode = f"--parallel {parallel}, {per_run}/run" + (", account cap C" * capped)
                mode += ", PostgreSQL" * postgres
                results.append((mode, figures))
                print(f"{name} {mode}: {figures['wall']:.2f} s", flush=True)
        plain = results[0][1]
        for mode, figures in results:
            table.append(
                {
                    "mode": mode,
                    "PxR:L:C": name,
                    "wall s": figures["wall"],
                    "CPU s": figures["cpu"],
                    "x plain wall": figures["wall"] / plain["wall"],
                    "x ideal": figures["wall"] / ideal,
                    "ideal s": ideal,
                    "peak server": int(figures["peak_server"]),
                    "peak queued": int(figures["peak_queued"]),
                    "emulator CPU s": figures["emu_cpu"],
                }
            )
    made = "existed before" if args.existing_instance else "was created by"
    print_table(f"backfill (the Dagster instance {made} each command)", table)
    print(f"(2 cores here: os.cpu_count() = {os.cpu_count()})")


if __name__ == "__main__":
    main()
