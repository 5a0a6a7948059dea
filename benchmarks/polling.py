"""Polling: status calls per job and how late a job's end is noticed, per poll schedule.

N jobs of L seconds each (default 16 x 20 s, all at once: the first wave, when the client
has no forecast yet) against the emulator in its own process, with three schedules:

* `plain 3 s`: the plain script, as RunComfy's own clients poll (a fixed interval);
* `remote`: the client's default against a real host (`REMOTE_POLL`);
* `loopback`: its default against the emulator (`LOCAL_POLL`).

Prints status calls per job (the emulator's count) and the mean lag between a job's end
(the API's `finished_at`) and the moment the client had its result, with ratios to the
plain script. Target: the remote schedule keeps a 20 s job to about 10 status calls.

    python benchmarks/polling.py
    python benchmarks/polling.py --jobs 32 --latency 60
    python benchmarks/polling.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Emulator, emulator, print_table

from flux2_pipeline.runcomfy import (
    LOCAL_POLL,
    REMOTE_POLL,
    AsyncRunComfyClient,
    EditRequest,
    PollSchedule,
)

PLAIN = PollSchedule(min_interval=3.0, max_interval=3.0, fraction=0.0)
SCHEDULES: dict[str, PollSchedule] = {
    "plain 3 s": PLAIN,
    "remote": REMOTE_POLL,
    "loopback": LOCAL_POLL,
}


async def _run(emu: Emulator, schedule: PollSchedule, jobs: int) -> list[float]:
    """Run the jobs at once; return each one's lag from its end to the client having it."""
    requests = [
        EditRequest.parse({"prompt": f"poll {i}", "image_urls": emu.sample_urls(i)})
        for i in range(jobs)
    ]
    async with AsyncRunComfyClient(
        None, emu.base_url, max_concurrency=jobs, poll=schedule
    ) as client:

        async def one(request: EditRequest) -> float:
            result = await client.run(request)
            if not result.ok or result.finished_at is None:
                raise SystemExit(f"a job did not complete: {result.error}")
            return (datetime.now(UTC) - result.finished_at).total_seconds()

        return list(await asyncio.gather(*(one(request) for request in requests)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=16, help="jobs at once (default 16)")
    parser.add_argument("--latency", type=float, default=20.0, help="job seconds (default 20)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parser.parse_args(argv)
    jobs = 4 if args.smoke else args.jobs
    latency = 2.0 if args.smoke else args.latency
    rows: list[dict[str, Any]] = []
    base: dict[str, float] = {}
    with emulator(latency, max_concurrent=jobs) as emu:
        for name, schedule in SCHEDULES.items():
            emu.reset()
            wall = time.perf_counter()
            lags = asyncio.run(_run(emu, schedule, jobs))
            wall = time.perf_counter() - wall
            calls = emu.stats()["status_calls"] / jobs
            lag = sum(lags) / len(lags)
            base.setdefault("calls", calls)
            base.setdefault("lag", lag)
            rows.append(
                {
                    "schedule": name,
                    "N": jobs,
                    "L s": latency,
                    "status/job": calls,
                    "expected": schedule.calls_needed(latency),
                    "x plain calls": calls / base["calls"],
                    "mean lag s": lag,
                    "x plain lag": lag / base["lag"] if base["lag"] > 0 else 0.0,
                    "wall s": wall,
                }
            )
    print_table(f"polling ({jobs} jobs of {latency:g} s, first wave)", rows)
    remote = next(row for row in rows if row["schedule"] == "remote")
    if latency >= 20 and remote["status/job"] > 10.5:
        raise SystemExit(f"remote schedule: {remote['status/job']:.1f} status calls a job (> 10)")


if __name__ == "__main__":
    main()
