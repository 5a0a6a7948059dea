"""Turning a ledger URL (or a plain file path) into a SQLAlchemy URL, and hiding passwords."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from flux2_pipeline.ledger.errors import LedgerConfigError

EXPECTED = "expected a file path, sqlite:///abs/path.db or postgresql://user@host:5432/db"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*$")


def _scheme_of(text: str) -> str:
    scheme = text.split("://", 1)[0]
    # Anything odd before :// might be part of a secret: never echo it.
    return scheme if _SCHEME.match(scheme) else "?"


def parse_ledger_url(url: str | Path) -> URL:
    """Parse `url` into a SQLAlchemy URL for pysqlite or psycopg2.

    A plain path (no ``://``) is a SQLite file. Relative SQLite paths are made absolute
    against the current directory, so every process of one run agrees on the file.
    Raises `LedgerConfigError` with a one-line message that never contains a password.
    """
    text = str(url).strip()
    if not text:
        raise LedgerConfigError(f"ledger URL is empty: {EXPECTED}")
    if "://" not in text:
        return URL.create("sqlite+pysqlite", database=str(Path(text).expanduser().resolve()))
    scheme = _scheme_of(text)
    try:
        parsed = make_url(text)
    except Exception:
        raise LedgerConfigError(f"ledger URL ({scheme}://...) is malformed: {EXPECTED}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise LedgerConfigError(
                f"ledger URL driver {parsed.drivername!r} unsupported: {EXPECTED}"
            )
        database = parsed.database or ""
        if (
            database in ("", ":memory:")
            or "mode=memory" in database
            or database.startswith("file:")
        ):
            raise LedgerConfigError(
                f"ledger URL must name a SQLite file (in-memory databases are not durable): "
                f"{EXPECTED}"
            )
        path = Path(database).expanduser().resolve()
        return parsed.set(drivername="sqlite+pysqlite", database=str(path))
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg2"):
            raise LedgerConfigError(
                f"ledger URL driver {parsed.drivername!r} unsupported (psycopg2 only): {EXPECTED}"
            )
        return parsed.set(drivername="postgresql+psycopg2")
    raise LedgerConfigError(f"ledger URL scheme {scheme!r} unsupported: {EXPECTED}")


def redact_database_url(url: URL | str) -> str:
    """`url` as text with any password replaced by ``***``.

    Example::

        redact_database_url("postgresql://me:s3cret@db/ledger")  # 'postgresql://me:***@db/ledger'
    """
    if isinstance(url, str):
        raw = url
        try:
            url = make_url(raw) if "://" in raw else URL.create("sqlite", database=raw)
        except Exception:
            return f"{_scheme_of(raw)}://..."
    return url.render_as_string(hide_password=True)
