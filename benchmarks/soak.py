"""Soak: the pipeline SIGKILLed again and again under faults, then re-run until done.

The emulator runs in its own process, in RunComfy's documented dialect, with 10% 429s,
10% 5xx (submits included), 5% of polls answered HTTP 200 with a `500001` error body,
half the jobs saying `succeeded` on `/status`, `/result` answering `400005` for 0.1 s after
a job ends, and 15% of jobs ending failed (seeded). `flux2-pipeline materialize --select
flux2_edits` runs over a prompt table of N rows (one or a few partitions) as a child
process and is SIGKILLed K times: each run is killed once the emulator has seen a drawn
number of its submits (at most the rows left over the kills left, so the last kill still
finds work), at the first look that finds jobs in flight. After the K kills it is
re-run (no kills) until every row is completed or `--max-runs` is reached: rows whose
jobs failed in every try of a run, and rows whose submit outcome was unknown (a 5xx, a
dropped answer, a killed run's open intent), are only resubmitted by a later run.

Settings of the runs, and why:

* `FLUX2_CLAIM_LEASE_SECONDS=3`: a killed run's open intents are claims that block
  every other run until their lease lapses (default 60 s, renewed every lease/3 by a
  live run's heartbeat). Only one run is alive at a time here, so a short lease only
  makes each restart take the dead run's rows over sooner, turning them `unknown`.
* `FLUX2_STEP_RETRIES=0`: the soak itself is the retry loop; a Dagster step retry
  would re-run the step inside the same child after `FLUX2_STEP_RETRY_DELAY` (10 s)
  and hide runs from the count.

Checks (exit 1 if any fails):

* rows lost = 0: every partition's results table has one row per input row, the same
  ids, and every row is `completed`;
* duplicates only within the counted unknown window: the jobs the emulator created
  that the ledger cannot name by request id (jobs created - attempts with a request
  id) are between 0 and the ledger's attempts whose outcome is unknown (state
  `unknown`, which includes every intent a restart took over, or a still-open
  `intent`); and every request body that created more than one job
  (`duplicate_bodies`) belongs to a row the ledger shows paid more than once;
* memory flat: among the killed runs, and among the runs that ran to their end, the
  highest peak RSS of the last (up to 3) <= 1.3x that of the first (up to 3): a run
  killed mid-way never reaches the peak of one that writes its whole results table, so
  the two kinds are compared each with its own;
* every kill landed with jobs in flight, and every run that was not killed exited 0
  (all done) or 1 (rows failed); the emulator forgot no request body.

    python benchmarks/soak.py                      # 10,000 rows, 20 kills (long)
    python benchmarks/soak.py --rows 2000 --kills 10
    python benchmarks/soak.py --smoke              # 300 rows, 3 kills (CI)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ChildRun,
    Emulator,
    cli_command,
    emulator,
    pipeline_env,
    print_table,
    run_child_until,
    write_prompt_table_in_child,
)

from flux2_pipeline.ledger import Ledger, Submission, SubmissionState

FLAT_RATIO = 1.3
FLAT_WINDOW = 3
STATS_EVERY = 0.25  # seconds between the kill timer's looks at the emulator


@dataclass(frozen=True)
class Plan:
    """What one soak does."""

    rows: int
    partitions: int
    kills: int
    max_runs: int
    concurrency: int
    latency: float
    kill_spread: float
    lease_seconds: float
    step_retries: int
    seed: int
    fault_429: float = 0.10
    fault_5xx: float = 0.10
    fail_rate: float = 0.15
    fault_200_error: float = 0.05
    succeeded_rate: float = 0.5
    result_lag: float = 0.1


class KillTimer:
    """Decides when to SIGKILL one run: once the emulator has seen `after_submits` of this
    run's submits, at the first look that finds jobs in flight.

    A count of submits, not a delay: how far a run gets in a given time depends on the
    machine and on how much the runs before it left, and a run that ends before its delay
    runs out is a kill that never lands."""

    def __init__(self, emu: Emulator, after_submits: int) -> None:
        self.emu = emu
        self.after_submits = max(1, after_submits)
        self.baseline = int(emu.stats()["submits_total"])
        self.next_look = 0.0
        self.in_flight_at_kill = 0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self.next_look:
            return False
        self.next_look = now + STATS_EVERY
        stats = self.emu.stats()
        if int(stats["submits_total"]) - self.baseline < self.after_submits:
            return False
        in_flight = int(stats["in_progress_now"]) + int(stats["queue_length_now"])
        if in_flight == 0:
            return False
        self.in_flight_at_kill = in_flight
        return True


@dataclass
class Soak:
    """Runs, kills and what they left behind."""

    plan: Plan
    runs: list[ChildRun] = field(default_factory=list)
    killed: list[bool] = field(default_factory=list)
    in_flight_at_kills: list[int] = field(default_factory=list)
    bad_exits: list[str] = field(default_factory=list)
    wall: float = 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000, help="input rows in all")
    parser.add_argument("--partitions", type=int, default=1, help="input files (partitions)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the pipeline")
    parser.add_argument("--max-runs", type=int, help="bound on runs (default kills + 15)")
    parser.add_argument("--concurrency", type=int, default=64, help="FLUX2_MAX_CONCURRENCY")
    parser.add_argument("--latency", type=float, default=0.2, help="emulator job latency (s)")
    parser.add_argument(
        "--kill-spread",
        type=float,
        default=1.0,
        help="each kill comes after a drawn number of the run's submits, up to this fraction "
        "of the rows left over the kills left (default 1.0)",
    )
    parser.add_argument("--lease", type=float, default=3.0, help="FLUX2_CLAIM_LEASE_SECONDS")
    parser.add_argument("--seed", type=int, default=11, help="seeds kill delays and faults")
    parser.add_argument("--smoke", action="store_true", help="300 rows, 3 kills (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.kills, args.concurrency, args.latency = 300, 3, 8, 0.2
    plan = Plan(
        rows=args.rows,
        partitions=args.partitions,
        kills=args.kills,
        max_runs=args.max_runs or args.kills + 15,
        concurrency=args.concurrency,
        latency=args.latency,
        kill_spread=args.kill_spread,
        lease_seconds=args.lease,
        step_retries=0,
        seed=args.seed,
    )
    for name in ("rows", "partitions", "max_runs", "concurrency"):
        if getattr(plan, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if plan.kills < 0 or plan.kill_spread < 0 or plan.latency < 0:
        parser.error("--kills, --kill-spread and --latency must not be negative")
    if plan.lease_seconds <= 0:
        parser.error("--lease must be more than 0 seconds")
    if plan.partitions > plan.rows:
        parser.error("--partitions must not exceed --rows")
    return 0 if soak(plan) else 1


def soak(plan: Plan) -> bool:
    """Run the soak; print its figures and checks; True when every check holds."""
    with (
        emulator(plan.latency, max_concurrent=plan.concurrency) as emu,
        tempfile.TemporaryDirectory(prefix="flux2-soak-") as tmp,
    ):
        emu.set_faults(
            fault_429=plan.fault_429,
            fault_5xx=plan.fault_5xx,
            fail_rate=plan.fail_rate,
            fault_200_error=plan.fault_200_error,
            succeeded_rate=plan.succeeded_rate,
            result_lag=plan.result_lag,
            retry_after="0.05",
            seed=plan.seed,
        )
        emulator_rss_start = emu.rss_mb()
        workdir = Path(tmp)
        inputs = write_inputs(emu, workdir, plan)
        env = pipeline_env(
            emu,
            workdir,
            plan.concurrency,
            {
                "FLUX2_CLAIM_LEASE_SECONDS": str(plan.lease_seconds),
                "FLUX2_STEP_RETRIES": str(plan.step_retries),
            },
        )
        record = Soak(plan)
        started = time.perf_counter()
        drive(emu, env, workdir, inputs, record)
        record.wall = time.perf_counter() - started
        stats = emu.stats()
        with Ledger.open(workdir / "output" / "ledger.sqlite") as ledger:
            attempts = ledger.submissions()
        lost, completed = rows_lost(workdir, inputs)
        return report(record, stats, attempts, lost, completed, emulator_rss_start, emu)


def write_inputs(emu: Emulator, workdir: Path, plan: Plan) -> dict[str, int]:
    """One Parquet file per partition, rows split evenly; returns rows per partition."""
    inputs: dict[str, int] = {}
    base, extra = divmod(plan.rows, plan.partitions)
    for index in range(plan.partitions):
        key = f"soak{index:02d}"
        size = base + (1 if index < extra else 0)
        path = workdir / "input" / f"{key}.parquet"
        write_prompt_table_in_child(path, size, emu.base_url, min(size, 50_000))
        inputs[key] = size
    return inputs


def drive(
    emu: Emulator, env: dict[str, str], workdir: Path, inputs: dict[str, int], record: Soak
) -> None:
    """K killed runs, then re-runs until every row is completed or the bound is hit."""
    plan = record.plan
    draw = random.Random(plan.seed)
    command = [*cli_command(), "materialize", "--select", "flux2_edits"]
    while len(record.runs) < plan.max_runs:
        kills_left = plan.kills - sum(record.killed)
        if kills_left > 0:
            left = max(1, plan.rows - int(emu.stats()["completed_jobs"]))
            most = max(1, int(plan.kill_spread * left / (kills_left + 1)))
            timer = KillTimer(emu, draw.randint(1, most))
            child, killed = run_child_until(command, env, timer)
            if killed:
                record.in_flight_at_kills.append(timer.in_flight_at_kill)
        else:
            child, killed = run_child_until(command, env, lambda: False)
        record.runs.append(child)
        record.killed.append(killed)
        label = f"run {len(record.runs)}"
        print(
            f"{label}: {'killed' if killed else f'exit {child.returncode}'} after "
            f"{child.wall:.1f} s, peak RSS {child.max_rss_mb:.0f} MB",
            flush=True,
        )
        if not killed and child.returncode not in (0, 1):
            record.bad_exits.append(f"{label} exited {child.returncode}: {child.stderr[-2000:]}")
            return
        # Done once a run ends on its own with every row completed (if that happens
        # before the K-th kill, the kills check reports it).
        if not killed and rows_lost(workdir, inputs)[0] == 0:
            return


def rows_lost(workdir: Path, inputs: dict[str, int]) -> tuple[int, int]:
    """(rows not completed or missing from the results, rows completed) over every partition."""
    lost = completed = 0
    for key, size in inputs.items():
        path = workdir / "output" / "flux2_edits" / f"{key}.parquet"
        if not path.exists():
            lost += size
            continue
        table = pq.read_table(path, columns=["row_id", "status"])
        ids = table.column("row_id").to_pylist()
        statuses = table.column("status").to_pylist()
        pairs = zip(ids, statuses, strict=True)
        done = {row_id for row_id, status in pairs if status == "completed"}
        expected = {f"row-{i}" for i in range(size)}
        completed += len(done & expected)
        # Missing or extra rows count as lost too: the table must match the input exactly.
        lost += len(expected - done) + abs(len(ids) - size) + len(set(ids) - expected)
    return lost, completed


@dataclass(frozen=True)
class LedgerFigures:
    """What the ledger says about money: named jobs, the unknown window, repaid rows."""

    named_jobs: int
    unknown_attempts: int
    takeovers: int
    rows_paid_again: int


def ledger_figures(attempts: list[Submission]) -> LedgerFigures:
    by_row: dict[str, list[Submission]] = defaultdict(list)
    for attempt in attempts:
        by_row[attempt.row_key].append(attempt)
    named = unknown = takeovers = paid_again = 0
    for history in by_row.values():
        history.sort(key=lambda a: a.attempt)
        may_have_job = 0
        for position, attempt in enumerate(history):
            if attempt.request_id is not None:
                named += 1
                may_have_job += 1
            elif attempt.state in (SubmissionState.UNKNOWN, SubmissionState.INTENT):
                unknown += 1
                may_have_job += 1
                if position < len(history) - 1:
                    takeovers += 1
        paid_again += may_have_job > 1
    return LedgerFigures(named, unknown, takeovers, paid_again)


def memory_checks(record: Soak) -> dict[str, bool]:
    """Last runs' peak RSS against the first runs', killed and finished runs apart."""
    checks: dict[str, bool] = {}
    for kind, killed in (("killed runs", True), ("runs to the end", False)):
        peaks = [
            run.max_rss_mb
            for run, was in zip(record.runs, record.killed, strict=True)
            if was is killed
        ]
        if len(peaks) < 2:
            continue
        window = max(1, min(FLAT_WINDOW, len(peaks) // 2))
        first, last = max(peaks[:window]), max(peaks[-window:])
        label = (
            f"memory flat, {kind}: peak of the last {window} {last:.0f} MB = "
            f"{last / first:.2f}x that of the first {window} {first:.0f} MB "
            f"(target <= {FLAT_RATIO}x)"
        )
        checks[label] = last <= FLAT_RATIO * first
    return checks


def report(
    record: Soak,
    stats: dict[str, Any],
    attempts: list[Submission],
    lost: int,
    completed: int,
    emulator_rss_start: float,
    emu: Emulator,
) -> bool:
    plan = record.plan
    money = ledger_figures(attempts)
    jobs = int(stats["jobs_created"])
    unnamed = jobs - money.named_jobs
    peaks = [run.max_rss_mb for run in record.runs]
    kills = sum(record.killed)
    print_table(
        f"soak ({plan.rows} rows in {plan.partitions} partition(s), C={plan.concurrency}, "
        f"latency {plan.latency} s, 429 {plan.fault_429:.0%}, 5xx {plan.fault_5xx:.0%}, "
        f"failed jobs {plan.fail_rate:.0%}, lease {plan.lease_seconds} s, "
        f"step retries {plan.step_retries}, seed {plan.seed})",
        [
            {
                "runs": len(record.runs),
                "kills": kills,
                "jobs created": jobs,
                "duplicates (unnamed jobs)": unnamed,
                "duplicate bodies": int(stats["duplicate_bodies"]),
                "unknown attempts": money.unknown_attempts,
                "takeovers": money.takeovers,
                "rows paid again": money.rows_paid_again,
                "rows completed": completed,
                "wall s": record.wall,
                "peak RSS MB min/median/max": f"{min(peaks):.0f}/{statistics.median(peaks):.0f}"
                f"/{max(peaks):.0f}",
            }
        ],
    )
    print(
        f"\nemulator: {stats['submits_total']} submits, {stats['rejected_429']} 429s, "
        f"{stats['rejected_5xx']} 5xx, {stats['dropped_submits']} dropped, "
        f"{stats['failed_jobs']} jobs failed, {stats['completed_jobs']} completed; "
        f"RSS {emulator_rss_start:.0f} -> {emu.rss_mb():.0f} MB"
    )
    print(f"jobs in flight at each kill: {record.in_flight_at_kills}")
    checks = {
        f"rows lost: {lost} (target 0)": lost == 0,
        f"duplicates: {unnamed} jobs the ledger cannot name, within 0..{money.unknown_attempts} "
        "unknown attempts": 0 <= unnamed <= money.unknown_attempts,
        f"duplicate bodies: {stats['duplicate_bodies']} <= {money.rows_paid_again} rows paid "
        "again": int(stats["duplicate_bodies"]) <= money.rows_paid_again,
        **memory_checks(record),
        f"kills: {kills} of {plan.kills}, each with jobs in flight": kills == plan.kills
        and all(n > 0 for n in record.in_flight_at_kills),
        f"runs not killed exited 0 or 1: {not record.bad_exits}": not record.bad_exits,
        f"emulator forgot {stats['forgotten_bodies']} request bodies (target 0)": int(
            stats["forgotten_bodies"]
        )
        == 0,
    }
    print()
    for label, met in checks.items():
        print(f"{label}: {'met' if met else 'NOT met'}")
    for failure in record.bad_exits:
        print(failure, file=sys.stderr)
    return all(checks.values())


if __name__ == "__main__":
    sys.exit(main())
