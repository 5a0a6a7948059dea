"""A pytest plugin: tests marked `postgres` skip when the server is down, unless under CI.

Outside CI a developer without PostgreSQL sees a clear skip reason; under `CI=true`
(`.ci/run` sets it) the same test fails instead, so real-service tests never skip
silently where they must run. The server probed is the one `FLUX2_TEST_POSTGRES_URL`
names (default `postgresql://postgres@127.0.0.1:5432/test`).

Example: `CI=true pytest -m postgres` fails fast when 127.0.0.1:5432 is not listening.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _address() -> tuple[str, int]:
    parts = urlsplit(os.environ.get("FLUX2_TEST_POSTGRES_URL", DEFAULT_URL))
    return parts.hostname or "127.0.0.1", parts.port or 5432


@functools.cache
def _unreachable(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as exc:
        return f"PostgreSQL is not reachable at {host}:{port} ({exc.strerror or exc})"


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres") is None:
        return
    reason = _unreachable(*_address())
    if reason is None:
        return
    if _under_ci():
        pytest.fail(f"{reason}; CI=true, so tests marked postgres must run", pytrace=False)
    pytest.skip(f"{reason}; start it or run under CI=true to make this a failure")
