"""Shared plumbing for the benchmarks: the emulator as a separate process, its counters,
child-process resource usage, input tables and a plain-text table printer."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

SAMPLES = ("cat", "dog", "sun", "beach_01")
MODEL_PATH = "/v1/models/blackforestlabs/flux-2/dev/edit"


async def run_all(client: Any, requests: Sequence[Any], concurrency: int) -> int:
    """Run every request through `client.run` with at most `concurrency` in flight, as the
    batch runner does; return how many completed with a result."""
    slots = asyncio.Semaphore(concurrency)

    async def one(request: Any) -> bool:
        async with slots:
            result = await client.run(request)
        return bool(result.ok)

    return sum(await asyncio.gather(*(one(request) for request in requests)))


def ideal_seconds(jobs: int, latency: float, concurrency: int) -> float:
    """The physical floor: ceil(N/C) rounds of one job latency each."""
    return math.ceil(jobs / concurrency) * latency


def cli_command() -> list[str]:
    """The `flux2-pipeline` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("flux2-pipeline")
    if script.exists():
        return [str(script)]
    found = shutil.which("flux2-pipeline")
    if found:
        return [found]
    return [sys.executable, "-c", "from flux2_pipeline.cli import main; main()"]


class Emulator:
    """`flux2-pipeline emulator` in its own process, with its counters and CPU time."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str) -> None:
        self.process = process
        self.base_url = base_url
        self._ps = psutil.Process(process.pid)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/_emulator/stats", timeout=10) as answer:
            data: dict[str, Any] = json.load(answer)
        return data

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.base_url}/_emulator/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """Change fault settings at `POST /_emulator/faults`; return the settings now."""
        request = urllib.request.Request(
            f"{self.base_url}/_emulator/faults",
            data=json.dumps(changes).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            data: dict[str, Any] = json.load(answer)
        return data

    def rss_mb(self) -> float:
        """The emulator process's resident memory now."""
        return float(self._ps.memory_info().rss) / 2**20

    def cpu_seconds(self) -> float:
        times = self._ps.cpu_times()
        return float(times.user + times.system)

    def sample_urls(self, index: int) -> list[str]:
        return [f"{self.base_url}/samples/{SAMPLES[index % len(SAMPLES)]}.png"]


@contextmanager
def emulator(latency: float, max_concurrent: int) -> Iterator[Emulator]:
    """Start the emulator as a separate process on a free port; stop it afterwards."""
    command = [
        *cli_command(),
        "emulator",
        "--port",
        "0",  # the emulator binds a free port itself and announces it: no port race
        "--latency",
        str(latency),
        "--max-concurrent",
        str(max_concurrent),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    announced = process.stdout.readline().decode()  # empty if the process died first
    if " listening on http" not in announced:
        err = process.stderr.read().decode() if process.stderr else ""
        process.kill()
        raise RuntimeError(f"the emulator did not start: {announced}{err}")
    running = Emulator(process, announced.rsplit(" ", 1)[1].strip())
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                running.stats()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    err = process.stderr.read().decode() if process.stderr else ""
                    raise RuntimeError(f"the emulator did not start: {err}") from None
                time.sleep(0.05)
        # Render the samples once so no benchmark pays for it.
        for name in SAMPLES:
            with urllib.request.urlopen(f"{running.base_url}/samples/{name}.png", timeout=30):
                pass
        yield running
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: exit code, wall and CPU seconds, peak RSS."""

    returncode: int
    wall: float
    cpu: float
    max_rss_mb: float
    stdout: str
    stderr: str


def run_child(command: Sequence[str], env: Mapping[str, str], timeout: float = 3600) -> ChildRun:
    """Run a command and read its own rusage with wait4 (CPU and ru_maxrss of that child).

    Raises `TimeoutError` naming the limit if the command runs over `timeout` seconds (it
    is killed): a silent kill once looked like an outside one.
    """
    started = time.perf_counter()
    with (
        open(os.devnull, "rb") as stdin,
        _temp_output() as out,
        _temp_output() as err,
    ):
        process = subprocess.Popen(
            list(command), env=dict(env), stdin=stdin, stdout=out, stderr=err
        )
        deadline = started + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if not timed_out and time.perf_counter() > deadline:
                process.kill()
                timed_out = True
            time.sleep(0.01)
        if timed_out:
            raise TimeoutError(f"{' '.join(command)} ran over its {timeout:.0f} s limit")
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(
            returncode=process.returncode,
            wall=wall,
            cpu=usage.ru_utime + usage.ru_stime,
            max_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def run_child_until(
    command: Sequence[str],
    env: Mapping[str, str],
    should_kill: Callable[[], bool],
    timeout: float = 3600,
) -> tuple[ChildRun, bool]:
    """`run_child`, but SIGKILL the child (and any process it started) the first time
    `should_kill()` returns True; return its figures and whether it was killed.

    `should_kill` is called about every 10 ms while the child runs: keep it cheap.
    """
    started = time.perf_counter()
    killed = False
    with (
        open(os.devnull, "rb") as stdin,
        _temp_output() as out,
        _temp_output() as err,
    ):
        # Its own session, so the kill reaches every process of the run and nothing else.
        process = subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=stdin,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if not killed and (time.perf_counter() > deadline or should_kill()):
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.01)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        child = ChildRun(
            returncode=process.returncode,
            wall=wall,
            cpu=usage.ru_utime + usage.ru_stime,
            max_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )
        return child, killed


@contextmanager
def _temp_output() -> Iterator[Any]:
    import tempfile

    with tempfile.TemporaryFile() as handle:
        yield handle


def write_prompt_table(path: Path, rows: int, emu: Emulator, start: int = 0) -> None:
    """A prompt table of `rows` distinct rows pointing at the emulator's sample images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = 50_000
    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("image_urls", pa.list_(pa.string()))]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(start, start + rows, chunk):
            last = min(first + chunk, start + rows)
            writer.write_table(
                pa.table(
                    {
                        "id": [f"row-{i}" for i in range(first, last)],
                        "prompt": [f"make it snow, variant {i}" for i in range(first, last)],
                        "image_urls": [emu.sample_urls(i) for i in range(first, last)],
                    },
                    schema=schema,
                )
            )


def pipeline_env(
    emu: Emulator, workdir: Path, concurrency: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for `flux2-pipeline materialize` against the emulator, under `workdir`."""
    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FLUX2_", "RUNCOMFY_", "DAGSTER_"))
    }
    env.update(
        {
            "RUNCOMFY_BASE_URL": emu.base_url,
            "FLUX2_INPUT_DIR": str(workdir / "input"),
            "FLUX2_OUTPUT_DIR": str(workdir / "output"),
            "FLUX2_MAX_CONCURRENCY": str(concurrency),
            "FLUX2_STEP_RETRIES": "0",
            "DAGSTER_HOME": str(home),
        }
    )
    env.update(extra or {})
    return env


def print_table(title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """A Markdown table (pasteable into README.md)."""
    print(f"\n### {title}\n")
    if not rows:
        print("_no rows_")
        return
    headers = list(rows[0])
    cells = [[_fmt(row.get(h)) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_prompt_table_in_child(
    path: Path, rows: int, base_url: str, row_group_rows: int, invalid: bool = False
) -> None:
    """Write a prompt table in a separate process, so this one stays small.

    A child's `ru_maxrss` counts the pages it shared with its parent at fork time: a
    benchmark that built a large table in its own memory would inflate every figure after.
    `invalid` rows have an empty prompt (each fails validation, naming `prompt`).
    """
    command = [
        sys.executable,
        str(Path(__file__)),
        "write-table",
        str(path),
        str(rows),
        base_url,
        str(row_group_rows),
        "invalid" if invalid else "valid",
    ]
    subprocess.run(command, check=True)


def _write_table_command(argv: Sequence[str]) -> None:
    path, rows, base_url, group, kind = Path(argv[0]), int(argv[1]), argv[2], int(argv[3]), argv[4]
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("image_urls", pa.list_(pa.string()))]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, rows, group):
            last = min(first + group, rows)
            prompt = "" if kind == "invalid" else "make it snow, variant {}"
            prompts = [prompt.format(i) for i in range(first, last)]
            table = pa.table(
                {
                    "id": [f"row-{i}" for i in range(first, last)],
                    "prompt": prompts,
                    "image_urls": [
                        [f"{base_url}/samples/{SAMPLES[i % len(SAMPLES)]}.png"]
                        for i in range(first, last)
                    ],
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=group)
    assert pq.ParquetFile(path).metadata.num_row_groups == math.ceil(rows / group)


if __name__ == "__main__" and sys.argv[1:2] == ["write-table"]:
    _write_table_command(sys.argv[2:])
