"""The local PostgreSQL for tests: the `postgres` marker's guard and a fresh database.

A pytest plugin (the root conftest loads it). Tests marked `postgres` skip when the
server is down, unless under CI: outside CI a developer without PostgreSQL sees a clear
skip reason; under `CI=true` (`.ci/run` sets it) the same test fails instead, so
real-service tests never skip silently where they must run. The server is the one
`FLUX2_TEST_POSTGRES_URL` names (default `postgresql://postgres@127.0.0.1:5432/test`).

`postgres_database` (a fixture) and `fresh_database` (for a fixture that needs several)
give a test an empty database of its own on that server, dropped afterwards.

Example:
    >>> @pytest.mark.postgres
    ... def test_it(postgres_database: str) -> None:
    ...     Ledger.open(postgres_database).close()
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

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


@contextmanager
def fresh_database(prefix: str = "flux2_test") -> Iterator[str]:
    """An empty database on the test server, dropped afterwards; yields its URL.

    The URL names the psycopg2 driver: SQLAlchemy 2.1 maps a bare postgresql:// to
    psycopg 3, which the ledger and dagster-postgres do not use.
    """
    server = make_url(os.environ.get("FLUX2_TEST_POSTGRES_URL", DEFAULT_URL))
    server = server.set(drivername="postgresql+psycopg2")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh, empty database on the local PostgreSQL for this test; its URL."""
    with fresh_database() as url:
        yield url
