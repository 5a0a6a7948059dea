"""Throughput: N jobs of latency L with C in flight, against the emulator in its own process.

Three ways to run the same jobs: (a) the project's client (`client.run` under a semaphore
of C, as the batch runner holds it), (b) a whole
`flux2-pipeline materialize` of one N-row partition (a subprocess), (c) a plain aiohttp
script, what a user would write (fixed 0.1 s polls). For each: wall and CPU seconds of
the client process, status calls per job (emulator counters) against what the poll
schedule needs, ratios to the plain script and to the ideal ceil(N/C)*L, and the
emulator's own CPU use (it must never be the bottleneck). Dagster's fixed start cost is
the wall time of a re-run of the finished partition (the ledger makes it pay nothing);
the `pipeline-net` row subtracts it. The `pipeline-capped` mode (not in the default set)
runs the pipeline again with `FLUX2_ACCOUNT_CONCURRENCY` = C: what taking and giving back
an account slot in the ledger costs per job.

    python benchmarks/throughput.py                      # the default sizes
    python benchmarks/throughput.py --scenario 2000:0.5:64 --modes pipeline,pipeline-capped
    python benchmarks/throughput.py --scenario 600:0.5:32 --modes plain,client
    python benchmarks/throughput.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    MODEL_PATH,
    Emulator,
    emulator,
    ideal_seconds,
    pipeline_env,
    print_table,
    run_all,
    run_child,
    write_prompt_table,
)

from flux2_pipeline.runcomfy import AsyncRunComfyClient, EditRequest, PollSchedule

MODES = ("plain", "client", "pipeline", "pipeline-capped")
DEFAULT_MODES = ("plain", "client", "pipeline")
TERMINAL = frozenset({"completed", "succeeded", "failed", "cancelled", "canceled"})
"""The words RunComfy's own CLI takes as a job's end (its `src/poll.rs`)."""
DONE = frozenset({"completed", "succeeded"})
PLAIN_POLL_SECONDS = 0.1


def body(emu: Emulator, index: int) -> dict[str, Any]:
    return {"prompt": f"make it snow, variant {index}", "image_urls": emu.sample_urls(index)}


async def plain_aiohttp(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> int:
    """What a user would write with aiohttp: submit, poll every 0.1 s, fetch the result."""
    slots = asyncio.Semaphore(concurrency)
    completed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def one(payload: dict[str, Any]) -> None:
            nonlocal completed
            async with slots:
                async with http.post(base_url + MODEL_PATH, json=payload) as answer:
                    request_id = (await answer.json())["request_id"]
                while True:
                    await asyncio.sleep(PLAIN_POLL_SECONDS)
                    async with http.get(f"{base_url}/v1/requests/{request_id}/status") as answer:
                        if (await answer.json())["status"] in TERMINAL:
                            break
                url = f"{base_url}/v1/requests/{request_id}/result?include_cost=true"
                async with http.get(url) as answer:
                    if (await answer.json())["status"] in DONE:
                        completed += 1

        await asyncio.gather(*(one(payload) for payload in bodies))
    return completed


async def client_jobs(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> int:
    """The project's client with its default transport and poll schedule, C jobs in flight."""
    requests = [EditRequest.parse(payload) for payload in bodies]
    async with AsyncRunComfyClient(None, base_url, max_concurrency=concurrency) as client:
        return await run_all(client, requests, concurrency)


Runner = Callable[[str, list[dict[str, Any]], int], Coroutine[Any, Any, int]]


def measure_in_process(
    emu: Emulator, runner: Runner, jobs: int, concurrency: int
) -> dict[str, float]:
    bodies = [body(emu, i) for i in range(jobs)]
    emu.reset()
    emu_cpu = emu.cpu_seconds()
    wall, cpu = time.perf_counter(), time.process_time()
    completed = asyncio.run(runner(emu.base_url, bodies, concurrency))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if completed != jobs:
        raise SystemExit(f"only {completed} of {jobs} jobs completed")
    return _figures(emu, wall, cpu, emu.cpu_seconds() - emu_cpu)


def measure_pipeline(
    emu: Emulator,
    jobs: int,
    concurrency: int,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """A materialize of a fresh N-row partition, then a re-run of it (Dagster's fixed cost)."""
    write_prompt_table(workdir / "input" / "bench.parquet", jobs, emu)
    env = pipeline_env(emu, workdir, concurrency, extra_env)
    command = [*_cli(), "materialize", "--partition", "bench", "--select", "flux2_edits"]
    figures = []
    for _ in ("first run", "re-run"):
        emu.reset()
        emu_cpu = emu.cpu_seconds()
        child = run_child(command, env)
        if child.returncode != 0:
            raise SystemExit(f"materialize failed ({child.returncode}):\n{child.stderr[-3000:]}")
        figures.append(_figures(emu, child.wall, child.cpu, emu.cpu_seconds() - emu_cpu))
    return figures[0], figures[1]


def _cli() -> list[str]:
    from _common import cli_command

    return cli_command()


def _figures(emu: Emulator, wall: float, cpu: float, emu_cpu: float) -> dict[str, float]:
    stats = emu.stats()
    requests = stats["submits_total"] + stats["status_calls"] + stats["result_calls"]
    return {
        "wall": wall,
        "cpu": cpu,
        "status_calls": float(stats["status_calls"]),
        "max_in_progress": float(stats["max_in_progress"]),
        "emu_cpu": emu_cpu,
        "requests": float(requests),
    }


def scenario(text: str) -> tuple[int, float, int]:
    try:
        jobs, latency, concurrency = text.split(":")
        return int(jobs), float(latency), int(concurrency)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N:L:C such as 600:0.5:32, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--scenario",
        type=scenario,
        action="append",
        metavar="N:L:C",
        help="jobs:latency:concurrency (repeatable; default 2000:0.5:64 and 600:0.5:32)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated subset of {','.join(MODES)}",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): 24 jobs, L=0.1, C=8")
    args = parser.parse_args(argv)
    scenarios = args.scenario or (
        [(24, 0.1, 8)] if args.smoke else [(2000, 0.5, 64), (600, 0.5, 32)]
    )
    modes = [mode for mode in args.modes.split(",") if mode]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}")
    schedule = PollSchedule()
    rows: list[dict[str, Any]] = []
    for jobs, latency, concurrency in scenarios:
        ideal = ideal_seconds(jobs, latency, concurrency)
        needed = schedule.calls_needed(latency)
        results: dict[str, dict[str, float]] = {}
        with (
            emulator(latency, max_concurrent=concurrency) as emu,
            tempfile.TemporaryDirectory(prefix="flux2-bench-") as tmp,
        ):
            for mode in modes:
                if mode == "plain":
                    results["plain"] = measure_in_process(emu, plain_aiohttp, jobs, concurrency)
                elif mode == "client":
                    results["client"] = measure_in_process(emu, client_jobs, jobs, concurrency)
                elif mode == "pipeline-capped":
                    # The same with the account-wide cap on: every submit takes a slot in the
                    # ledger and gives it back; what that costs per job.
                    cap = {"FLUX2_ACCOUNT_CONCURRENCY": str(concurrency)}
                    first, _ = measure_pipeline(emu, jobs, concurrency, Path(tmp) / mode, cap)
                    results[mode] = first
                else:
                    first, rerun = measure_pipeline(emu, jobs, concurrency, Path(tmp) / mode)
                    results["pipeline"] = first
                    results["dagster-fixed"] = rerun
                    results["pipeline-net"] = {
                        **first,
                        "wall": first["wall"] - rerun["wall"],
                        "cpu": first["cpu"] - rerun["cpu"],
                    }
        plain = results.get("plain")
        for mode, fig in results.items():
            per_job = mode != "dagster-fixed"
            row: dict[str, Any] = {
                "mode": mode,
                "N:L:C": f"{jobs}:{latency:g}:{concurrency}",
                "wall s": fig["wall"],
                "CPU s": fig["cpu"],
                "CPU ms/job": 1000 * fig["cpu"] / jobs if per_job else None,
                "status/job": fig["status_calls"] / jobs if per_job else None,
                "schedule needs": needed if mode not in ("plain", "dagster-fixed") else None,
                "x plain wall": fig["wall"] / plain["wall"] if plain and per_job else None,
                "x plain CPU": fig["cpu"] / plain["cpu"] if plain and per_job else None,
                "x ideal": fig["wall"] / ideal if per_job else None,
                "ideal s": ideal,
                "emulator CPU %": 100 * fig["emu_cpu"] / fig["wall"] if fig["wall"] > 0 else None,
                "emulator req/s": fig["requests"] / fig["wall"] if fig["wall"] > 0 else None,
            }
            rows.append(row)
    print_table("throughput", rows)


if __name__ == "__main__":
    main()
