"""Transport: the client over httpx's own pool (`httpx.AsyncHTTPTransport`) vs its default,
aiohttp's pool (`AiohttpTransport`).

Same jobs (`--rounds` x C of them, latency L) at C = 1, 32 and 256 against the emulator
in its own process; prints wall and CPU seconds of this process, CPU ms per job and
ratios to the ideal ceil(N/C)*L. The client's default transport is chosen by these
figures (see benchmarks/README.md).

    python benchmarks/transport.py
    python benchmarks/transport.py --concurrency 64 --rounds 30
    python benchmarks/transport.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Emulator, emulator, ideal_seconds, print_table, run_all

from flux2_pipeline.runcomfy import AiohttpTransport, AsyncRunComfyClient, EditRequest

TRANSPORTS = ("httpx", "aiohttp")


def _transport(name: str, concurrency: int) -> httpx.AsyncBaseTransport | AiohttpTransport:
    # The same limits the client gives its default transport.
    connections = max(16, 2 * concurrency)
    if name == "httpx":
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncHTTPTransport(limits=limits)
    return AiohttpTransport(max_connections=connections)


async def _run(emu: Emulator, name: str, jobs: int, concurrency: int) -> int:
    requests = [
        EditRequest.parse({"prompt": f"snow {i}", "image_urls": emu.sample_urls(i)})
        for i in range(jobs)
    ]
    async with AsyncRunComfyClient(
        None,
        emu.base_url,
        max_concurrency=concurrency,
        transport=_transport(name, concurrency),
    ) as client:
        return await run_all(client, requests, concurrency)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--concurrency", type=int, action="append", help="repeatable; default 1, 32, 256"
    )
    parser.add_argument("--rounds", type=int, default=8, help="jobs = rounds x C (default 8)")
    parser.add_argument("--latency", type=float, default=0.5, help="emulated job seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parser.parse_args(argv)
    levels = args.concurrency or ([1, 8] if args.smoke else [1, 32, 256])
    rounds = 2 if args.smoke else args.rounds
    latency = 0.1 if args.smoke else args.latency
    rows: list[dict[str, Any]] = []
    with emulator(latency, max_concurrent=max(levels)) as emu:
        for concurrency in levels:
            jobs = rounds * concurrency
            ideal = ideal_seconds(jobs, latency, concurrency)
            base: dict[str, float] = {}
            for name in TRANSPORTS:
                emu.reset()
                emu_cpu = emu.cpu_seconds()
                wall, cpu = time.perf_counter(), time.process_time()
                completed = asyncio.run(_run(emu, name, jobs, concurrency))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if completed != jobs:
                    raise SystemExit(f"{name}: only {completed} of {jobs} jobs completed")
                stats = emu.stats()
                base.setdefault("wall", wall)
                base.setdefault("cpu", cpu)
                requests = stats["submits_total"] + stats["status_calls"] + stats["result_calls"]
                rows.append(
                    {
                        "transport": name,
                        "C": concurrency,
                        "N": jobs,
                        "wall s": wall,
                        "CPU s": cpu,
                        "CPU ms/job": 1000 * cpu / jobs,
                        "x ideal": wall / ideal,
                        "x httpx wall": wall / base["wall"],
                        "x httpx CPU": cpu / base["cpu"],
                        "status/job": stats["status_calls"] / jobs,
                        "emulator CPU %": 100 * (emu.cpu_seconds() - emu_cpu) / wall,
                        "emulator req/s": requests / wall,
                    }
                )
    print_table(f"transport (L={latency:g} s)", rows)


if __name__ == "__main__":
    main()
