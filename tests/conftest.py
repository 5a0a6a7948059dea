"""Fixtures shared by every test layer: a running emulator, a ledger on each backend, S3.

Plain helpers live in `tests/helpers/`; the `postgres` marker's guard is its plugin.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.ledger import Ledger
from tests.helpers.emulator import emulator_config
from tests.helpers.signals import keep_sigterm_deliverable

pytest_plugins = ["tests.helpers.postgres"]


# No per-example deadline: on a loaded machine Hypothesis's default 200 ms flakes, and
# nothing here promises a speed per example. HYPOTHESIS_PROFILE=dev restores the default.
hypothesis_settings.register_profile("ci", deadline=None)
hypothesis_settings.register_profile("dev")
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

keep_sigterm_deliverable()


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    """A token-protected emulator on a free loopback port; tests adjust `state.faults`."""
    with EmulatorServer(emulator_config()) as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new ledger's URL, once per backend: a SQLite file, a fresh PostgreSQL database.

    Tests (and the processes they start) open the ledger from it; the same assertions
    then hold on both backends.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger' / 'ledger.sqlite'}"
        return
    yield request.getfixturevalue("postgres_database")


@pytest.fixture
def ledger_schema(ledger_url: str) -> str | None:
    """The schema the `ledger` fixture puts its tables in: a named one on PostgreSQL, so
    the statements run through the schema translation as a shared server's would."""
    return None if ledger_url.startswith("sqlite") else "flux2_ledger"


@pytest.fixture
def ledger(ledger_url: str, ledger_schema: str | None) -> Iterator[Ledger]:
    """The ledger at `ledger_url` (in `ledger_schema`), open for the test."""
    with Ledger.open(ledger_url, schema=ledger_schema) as opened:
        yield opened


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
