"""Fixtures shared by every test layer: sample tables and a running emulator."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import settings as hypothesis_settings

from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from tests._postgres_guard import pytest_runtest_setup

TEST_TOKEN = "tok-ZQ8xv3Lr5Hn0wPq2"

__all__ = [
    "TEST_TOKEN",
    "emulator_config",
    "prompt_rows",
    "pytest_runtest_setup",
    "refused_port",
    "write_table",
]


# No per-example deadline: on a loaded machine Hypothesis's default 200 ms flakes, and
# nothing here promises a speed per example. HYPOTHESIS_PROFILE=dev restores the default.
hypothesis_settings.register_profile("ci", deadline=None)
hypothesis_settings.register_profile("dev")
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def keep_sigterm_deliverable() -> None:
    """Make SIGINT interrupt this process as at a terminal, if it was started ignoring it.

    A pytest started from a script in the background (or by some CI runners) ignores SIGINT,
    and Dagster's in-process runs copy SIGINT's handler to SIGTERM when they end: from the
    first run on, SIGTERM is ignored too, and so is it in every process a test spawns after
    it. `multiprocessing.Pool.terminate()` then waits forever for workers that do not die:
    a round of `make test-under-load` hung so in tests/unit/test_ledger_claims.py.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


keep_sigterm_deliverable()

_HELD_PORTS: list[socket.socket] = []


def refused_port() -> int:
    """A loopback port this process holds bound and never listens on: connections are refused.

    The socket stays bound until the test process exits, so no other test or process can
    take the port in between (unlike binding port 0, closing it, then using the number).
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(sock)
    return int(sock.getsockname()[1])


def write_table(folder: Path, name: str, rows: list[dict[str, Any]] | pa.Table) -> Path:
    """Write `rows` as `<folder>/<name>.parquet` and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    path = folder / f"{name}.parquet"
    pq.write_table(table, path)
    return path


def prompt_rows(base_url: str, prefix: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    """`count` valid rows whose reference images the emulator serves."""
    return [
        {
            "id": f"{prefix}-{i}",
            "prompt": f"{prefix} edit number {i}",
            "image_urls": [f"{base_url}/samples/{prefix}-{i % 3}.png"],
            "seed": i,
            **extra,
        }
        for i in range(count)
    ]


def emulator_config() -> EmulatorConfig:
    """The settings of the `emulator` fixture, for a module-scoped emulator of a test's own."""
    return EmulatorConfig(
        port=0, latency=0.05, max_concurrent=32, token=TEST_TOKEN, retry_after="0.05", seed=1
    )


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    """A token-protected emulator on a free loopback port; tests adjust `state.faults`."""
    with EmulatorServer(emulator_config()) as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto) on a free loopback port, for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket on the local S3 server; returns its name."""
    import uuid

    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"flux2-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return name
