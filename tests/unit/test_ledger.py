"""The ledger's keys and URLs, and its SQLite specifics on real files in tmp_path.

The lifecycle on both backends is in tests/integration/test_ledger_lifecycle.py; killed
and concurrent processes in tests/integration/test_ledger_processes.py."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from flux2_pipeline.ledger import (
    Ledger,
    LedgerConfigError,
    LedgerError,
    LedgerUnavailableError,
    SubmissionState,
    make_row_key,
    parse_ledger_url,
    redact_database_url,
)
from tests.helpers.ledger import record_row_intent

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _chain_text(exc: BaseException | None) -> str:
    """Every message and repr in an exception's cause/context chain (not source lines)."""
    parts: list[str] = []
    while exc is not None:
        parts += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


# -- keys and URLs ------------------------------------------------------------------


def test_make_row_key_is_stable_sha256_and_unambiguous() -> None:
    key = make_row_key("p", "1", "abc")
    assert key == make_row_key("p", "1", "abc")
    assert len(key) == 64 and int(key, 16) >= 0
    assert make_row_key("p", "1a", "bc") != key
    assert make_row_key("p1", "", "abc") != make_row_key("p", "1", "abc")


def test_plain_path_and_relative_sqlite_url_become_absolute(tmp_path: Path) -> None:
    assert parse_ledger_url(tmp_path / "a.db").database == str(tmp_path / "a.db")
    parsed = parse_ledger_url("sqlite:///rel/x.db")
    assert parsed.database is not None and Path(parsed.database).is_absolute()
    assert parse_ledger_url("postgres://u@h/db").drivername == "postgresql+psycopg2"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "sqlite://",
        "sqlite:///:memory:",
        "mysql://u:s3cret@h/db",
        "postgresql+asyncpg://u:s3cret@h/db",
        "postgresql://u:s3cret@h:notaport/db",
        "post gres://u:s3cret@h/db",
    ],
)
def test_malformed_urls_raise_one_line_config_error_without_password(url: str) -> None:
    with pytest.raises(LedgerConfigError) as info:
        Ledger.open(url)
    message = str(info.value)
    assert "\n" not in message and message
    assert "s3cret" not in message
    assert "s3cret" not in _chain_text(info.value)


def test_redact_database_url_hides_passwords() -> None:
    assert redact_database_url("postgresql://me:s3cret@db:5432/ledger") == (
        "postgresql://me:***@db:5432/ledger"
    )
    assert "s3cret" not in redact_database_url(parse_ledger_url("postgresql://me:s3cret@db/x"))
    assert "s3cret" not in redact_database_url("postgresql://me:s3cret@db:bad/x")


def test_unreachable_postgres_error_hides_password() -> None:
    # Port 1 on loopback refuses at once; the message and the chain must not leak.
    with pytest.raises(LedgerUnavailableError) as info:
        Ledger.open("postgresql://me:s3cret-pw@127.0.0.1:1/db")
    assert "s3cret-pw" not in _chain_text(info.value)
    assert "Connection refused" in str(info.value) or "connect" in str(info.value)
    assert "me:***@127.0.0.1:1/db" in str(info.value)


def test_repr_hides_password_without_connecting() -> None:
    # A Ledger wraps any engine; repr only renders the URL.
    from sqlalchemy import create_engine

    url = parse_ledger_url("postgresql://me:s3cret@db.example:5432/ledger")
    ledger = Ledger(create_engine(url), url)
    assert "s3cret" not in repr(ledger) and "s3cret" not in str(ledger)
    assert "me:***@db.example:5432/ledger" in repr(ledger)
    assert "s3cret" not in ledger.url


# -- SQLite setup ---------------------------------------------------------------------


def test_sqlite_creates_parent_dir_and_uses_wal_full(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "ledger.db"
    with Ledger.open(str(path)) as ledger:
        assert path.exists()
        assert ledger.backend == "sqlite"
        with ledger.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            # FULL: an intent is on disk before its request leaves.
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
    # Reopening an existing ledger is idempotent.
    with Ledger.open(str(path)) as again:
        assert again.submissions() == []


def test_closed_ledger_refuses_calls(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.db")
    ledger.close()
    ledger.close()
    assert "closed" in repr(ledger)
    with pytest.raises(LedgerError, match="closed"):
        ledger.stats()


def test_concurrent_first_open_from_threads(tmp_path: Path) -> None:
    db = tmp_path / "first.db"
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def opener() -> None:
        barrier.wait()
        try:
            with Ledger.open(db) as opened:
                record_row_intent(opened)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Ledger.open(db) as ledger:
        assert len(ledger.submissions()) == 6


def test_spilled_request_ids_are_recorded_by_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    now = datetime.now(UTC)
    with Ledger.open(path) as ledger:
        first = ledger.record_intent(make_row_key("p", "a", "h"), "p", "a", "h")
        second = ledger.record_intent(make_row_key("p", "b", "h"), "p", "b", "h")
        ledger.record_submitted(second.id, "job-b", now)
        assert ledger.spill_path == Path(f"{path}.unrecorded.jsonl")
        assert ledger.spill_submitted(first.id, "job-a", now)
        assert ledger.spill_submitted(second.id, "job-b", now)  # it landed after all
        with ledger.spill_path.open("a") as spill:
            spill.write('{"submission_id": 1, "requ')  # a line a crash cut short
    with Ledger.open(path) as ledger:
        recorded = {a.row_id: (a.state, a.request_id) for a in ledger.submissions("p")}
        assert recorded == {
            "a": (SubmissionState.SUBMITTED, "job-a"),
            "b": (SubmissionState.SUBMITTED, "job-b"),
        }
        assert not Path(f"{path}.unrecorded.jsonl").exists()
