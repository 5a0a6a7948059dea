"""`Ledger`: the durable record of paid submissions, on SQLite or PostgreSQL.

Every write is one short transaction, committed before the method returns: the intent
before the HTTP submit is sent, the request id the moment the response arrives.

SQLite runs in WAL mode with ``synchronous=FULL``: an intent is on disk (fsync) before
the request it announces leaves, so not even a power loss can forget a job that may
exist. Every SQLite transaction starts with ``BEGIN IMMEDIATE``: it takes the write lock
up front, so a claim's read and write see one state and two processes wait on
``busy_timeout`` instead of deciding from the same stale read or failing with "database
is locked". On PostgreSQL an advisory lock per row key serializes claims across machines,
and the account row (spend) is locked ``FOR UPDATE`` when a budget or a cap is checked.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

from sqlalchemy import (
    ColumnElement,
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.schema import CreateIndex, CreateSchema, CreateTable

from flux2_pipeline.ledger.claims import (
    ACCOUNT_REFUSAL_TTL_SECONDS,
    DEFAULT_LEASE_SECONDS,
    ORPHANED_JOB_SLOT_SECONDS,
    AccountRefusal,
    AccountState,
    ClaimAction,
    ClaimDecision,
    ClaimRequest,
    decide,
)
from flux2_pipeline.ledger.errors import (
    LedgerConfigError,
    LedgerConflictError,
    LedgerError,
    LedgerStateError,
    LedgerUnavailableError,
)
from flux2_pipeline.ledger.prepared import PreparedStatements
from flux2_pipeline.ledger.records import RowHistory, Submission, submission_from_row
from flux2_pipeline.ledger.schema import (
    ADDED_COLUMNS,
    FINISHED_STATES,
    OPEN_STATES,
    SubmissionState,
    account_refusals,
    ledger_account,
    submissions,
)
from flux2_pipeline.ledger.url import parse_ledger_url, redact_database_url

logger = logging.getLogger(__name__)

LOOKUP_CHUNK_SIZE = 500
"""Row keys per ``IN (...)`` query in `Ledger.lookup` (well under SQLite's variable limit)."""

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for another process's write lock before failing."""

INTENT_RETRIES = 32
"""`record_intent` retries when a concurrent writer took the same attempt number."""

PG_CONNECT_TIMEOUT_S = 10

PG_LOCK_TIMEOUT_MS = 30_000
"""How long a PostgreSQL statement waits for a lock (a row, an advisory lock) before it
fails: the counterpart of SQLite's busy timeout, so a stuck lock surfaces as a
`LedgerUnavailableError` that the caller can retry instead of a hang."""

PG_STATEMENT_TIMEOUT_MS = 60_000
"""Most any one PostgreSQL statement may run; past it the server cancels it (an error)."""
# Serializes table creation across processes: concurrent CREATE TABLE IF NOT EXISTS on
# PostgreSQL can still fail on the catalog's unique index.
_PG_DDL_LOCK_KEY = 0x464C5832_4C454447  # "FLX2LEDG"

_CONFLICT_CODES = frozenset({"40P01", "40001"})
"""PostgreSQL's deadlock_detected and serialization_failure: the transaction may be re-run."""

_t = submissions
_a = ledger_account
_r = account_refusals
_NO_REQUEST_ID = _t.c.request_id.is_(None)
_ACCOUNT_ROW = _a.c.id == 1


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None, name: str) -> datetime:
    if value is None:
        return _now()
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def _states(*states: SubmissionState) -> ColumnElement[bool]:
    # One named parameter per state (not an expanding list): the statement compiles to
    # fixed SQL, which `PreparedStatement` needs.
    return _t.c.state.in_([bindparam(f"state_{s.value}", s.value) for s in states])


def _finished_state(state: SubmissionState | str) -> SubmissionState:
    if state not in FINISHED_STATES:  # a StrEnum: its plain values are members too
        allowed = ", ".join(sorted(s.value for s in FINISHED_STATES))
        raise ValueError(f"finished state must be one of {allowed}, got {state!r}")
    return SubmissionState(state)


_GUARDS: dict[str, ColumnElement[bool]] = {
    # An intent (or a lost answer) gets its request id; the same id again is a no-op.
    "submit": (_states(SubmissionState.INTENT, SubmissionState.UNKNOWN) & _NO_REQUEST_ID)
    | (
        (_t.c.state == SubmissionState.SUBMITTED.value)
        & (_t.c.request_id == bindparam("g_request_id"))
    ),
    "reject": _states(SubmissionState.INTENT, SubmissionState.UNKNOWN, SubmissionState.REJECTED)
    & _NO_REQUEST_ID,
    "unknown": _states(SubmissionState.INTENT, SubmissionState.UNKNOWN) & _NO_REQUEST_ID,
    # A finished job may be re-polled and re-recorded; only a job with an id can end.
    "finish": ~_NO_REQUEST_ID & _states(SubmissionState.SUBMITTED, *FINISHED_STATES),
}

_ADD_SPEND = (
    update(_a)
    .where(_ACCOUNT_ROW)
    .values(spent_usd=_a.c.spent_usd + bindparam("delta"), updated_at=bindparam("now"))
)


_ATTEMPTS_OF_KEYS = (
    select(*_t.c).where(_t.c.row_key.in_(bindparam("keys", expanding=True))).order_by(_t.c.attempt)
)
_ATTEMPTS_OF_KEY = select(*_t.c).where(_t.c.row_key == bindparam("key")).order_by(_t.c.attempt)
_SPENT_FOR_UPDATE = select(_a.c.spent_usd).where(_ACCOUNT_ROW).with_for_update()
_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_INSERT_INTENT = (
    insert(_t)
    .values({c.name: bindparam(f"v_{c.name}") for c in _t.c if c.name != "id"})
    .returning(*_t.c)
)
_OPEN_SLOTS = select(func.count()).where(
    _states(*sorted(OPEN_STATES)),
    (_t.c.lease_until > bindparam("now"))
    | (
        (_t.c.state == bindparam("slot_submitted", SubmissionState.SUBMITTED.value))
        & (_t.c.submitted_at > bindparam("orphaned_before"))
    ),
)
"""Taken account slots: open attempts with a live lease, and submitted jobs (whoever
holds them) until they end or `ORPHANED_JOB_SLOT_SECONDS` after their submit."""
_LATEST_REFUSAL = (
    select(_r.c.reason, _r.c.recorded_at, _r.c.expires_at)
    .where(_r.c.expires_at > bindparam("now"))
    .order_by(_r.c.recorded_at.desc(), _r.c.id.desc())
    .limit(1)
)


def _slot_params(now: datetime) -> dict[str, Any]:
    return {"now": now, "orphaned_before": now - timedelta(seconds=ORPHANED_JOB_SLOT_SECONDS)}


@dataclass(frozen=True, slots=True)
class _Lease:
    """Who claims, when, and until when their new or adopted claims hold."""

    holder: str
    now: datetime
    until: datetime


def _adopt(conn: Connection, submission_id: int, lease: _Lease) -> None:
    conn.execute(
        update(_t)
        .where(_t.c.id == submission_id)
        .values(holder=lease.holder, lease_until=lease.until)
    )


def _give_up_intent(conn: Connection, submission_id: int, now: datetime) -> None:
    """A lapsed intent that a new attempt replaces: its request may have left, so unknown."""
    conn.execute(
        update(_t)
        .where(_t.c.id == submission_id)
        .values(
            state=SubmissionState.UNKNOWN.value,
            holder=None,
            updated_at=now,
            error="its runner stopped before the answer was recorded; "
            "the request may have reached the API",
        )
    )


@dataclass(frozen=True)
class _UpdateStatements:
    name: str
    update: Any
    current: Any
    charge_before: Any | None


@functools.lru_cache(maxsize=64)
def _update_statements(guard: str, names: tuple[str, ...]) -> _UpdateStatements:
    where = _t.c.id == bindparam("k_value")
    values: dict[str, Any] = {name: bindparam(f"v_{name}") for name in (*names, "updated_at")}
    charge_before = None
    if "charge_usd" in names:
        charge_before = select(_t.c.charge_usd).where(where, _GUARDS[guard]).with_for_update()
    return _UpdateStatements(
        name=f"update:id:{guard}:{','.join(names)}",
        update=update(_t).where(where, _GUARDS[guard]).values(values).returning(*_t.c),
        current=select(_t.c.id, _t.c.state, _t.c.request_id).where(where),
        charge_before=charge_before,
    )


def _sqlite_engine(url: URL) -> Engine:
    assert url.database is not None
    try:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        shown = redact_database_url(url)
        raise LedgerUnavailableError(
            f"cannot create the ledger directory for {shown}: {exc.strerror}"
        ) from exc
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _postgres_engine(url: URL, schema: str | None) -> Engine:
    options: dict[str, Any] = {}
    if schema is not None:
        options["schema_translate_map"] = {None: schema}
    return create_engine(
        url,
        pool_pre_ping=True,
        execution_options=options,
        connect_args={
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
            "application_name": "flux2-pipeline-ledger",
            "options": f"-c lock_timeout={int(PG_LOCK_TIMEOUT_MS)} "
            f"-c statement_timeout={int(PG_STATEMENT_TIMEOUT_MS)}",
        },
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver must not open transactions on its own: `_sqlite_begin` opens each one
    # with BEGIN IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _advisory_key(row_key: str) -> int:
    # A signed 64-bit number from the key's sha256 hex (row keys are hex digests).
    try:
        return int(row_key[:15], 16)
    except ValueError:
        return int.from_bytes(row_key.encode()[:7].ljust(7, b"\0"), "big")


def _switch_to_wal(cursor: Any) -> None:
    # Switching a new file to WAL needs an exclusive lock, and SQLite can answer
    # "database is locked" there without waiting out busy_timeout when another process
    # opens the same new file at once. WAL is stored in the file, so a retry finds it set.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _add_missing_columns(conn: Connection, schema: str | None) -> None:
    """Bring a ledger written by an older release up to the current columns."""
    from sqlalchemy import inspect

    # Named explicitly: neither reflection nor a raw ALTER applies schema_translate_map.
    present = {column["name"] for column in inspect(conn).get_columns(_t.name, schema=schema)}
    preparer = conn.dialect.identifier_preparer
    table = preparer.quote(_t.name)
    if schema is not None:
        table = f"{preparer.quote_schema(schema)}.{table}"
    for name in ADDED_COLUMNS:
        if name not in present:
            column = _t.c[name]
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {preparer.quote(name)} {kind}")


class Ledger:
    """The durable record of paid API submissions: one row per submission attempt.

    Open with `Ledger.open`; the object is safe to share between threads (each call
    checks a connection out of the engine's pool and commits before returning).

    Example::

        with Ledger.open("data/output/ledger.db") as ledger:
            key = make_row_key(partition, row_id, request_sha256)
            history = ledger.lookup([key]).get(key)
            intent = ledger.record_intent(key, partition, row_id, request_sha256)
            ledger.record_submitted(intent.id, request_id)        # right after the POST
            ledger.record_finished(intent.id, "completed", cost_usd=0.025,
                                   output_urls=["https://..."])
    """

    def __init__(self, engine: Engine, url: URL, *, schema: str | None = None) -> None:
        """Wrap an engine whose tables exist; use `Ledger.open` instead."""
        self._engine = engine
        self._url = url
        self._schema = schema
        self._closed = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._prepared = PreparedStatements({None: schema} if schema is not None else None)

    # -- opening and closing -------------------------------------------------------

    @classmethod
    def open(cls, url: str | Path, *, schema: str | None = None) -> Ledger:
        """Open (and create if missing) the ledger at `url`.

        `url` is a plain file path or ``sqlite:///abs/path.db`` (parent directories are
        created), or ``postgresql://...`` / ``postgresql+psycopg2://...``. `schema`
        (PostgreSQL only) puts the table in that schema, creating it if missing.

        Raises `LedgerConfigError` for a malformed URL and `LedgerUnavailableError` when
        the database cannot be reached.
        """
        parsed = parse_ledger_url(url)
        if parsed.get_backend_name() == "sqlite":
            if schema is not None:
                raise LedgerConfigError("ledger schema is only supported on PostgreSQL")
            engine = _sqlite_engine(parsed)
        else:
            engine = _postgres_engine(parsed, schema)
        ledger = cls(engine, parsed, schema=schema)
        try:
            ledger._create_tables()
        except BaseException:
            engine.dispose()
            raise
        ledger._replay_spill()
        return ledger

    def _create_tables(self) -> None:
        with self._begin(f"cannot open the ledger at {redact_database_url(self._url)}") as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(_ADVISORY_LOCK, {"key": _PG_DDL_LOCK_KEY})
                if self._schema is not None:
                    conn.execute(CreateSchema(self._schema, if_not_exists=True))
            conn.execute(CreateTable(_t, if_not_exists=True))
            _add_missing_columns(conn, self._schema)
            for index in sorted(_t.indexes, key=lambda i: str(i.name)):
                conn.execute(CreateIndex(index, if_not_exists=True))
            conn.execute(CreateTable(_a, if_not_exists=True))
            if conn.execute(select(_a.c.id).where(_ACCOUNT_ROW)).first() is None:
                # A ledger from before the account row: its spend is what it recorded.
                charges = func.coalesce(_t.c.charge_usd, _t.c.cost_usd)
                spent = conn.execute(select(func.coalesce(func.sum(charges), 0))).scalar_one()
                conn.execute(insert(_a).values(id=1, spent_usd=float(spent), updated_at=_now()))
            conn.execute(CreateTable(_r, if_not_exists=True))
            for index in sorted(_r.indexes, key=lambda i: str(i.name)):
                conn.execute(CreateIndex(index, if_not_exists=True))

    def close(self) -> None:
        """Close every pooled connection; later calls raise `LedgerError`."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        schema = f" schema={self._schema!r}" if self._schema else ""
        return f"<Ledger {redact_database_url(self._url)}{schema}{state}>"

    # -- request ids the database could not take --------------------------------------

    @property
    def spill_path(self) -> Path | None:
        """Where `spill_submitted` keeps request ids: beside a SQLite file; None on PostgreSQL."""
        if self.backend != "sqlite" or not self._url.database:
            return None
        return Path(f"{self._url.database}.unrecorded.jsonl")

    def spill_submitted(self, submission_id: int, request_id: str, submitted_at: datetime) -> bool:
        """Keep a request id the database failed to record, for the next `Ledger.open`.

        For a run that must stop while its ledger is locked: the line is appended (and
        fsynced) to `spill_path`, and whoever opens the ledger next records it, so a re-run
        polls that job instead of paying for the row again. False when there is no such
        file (PostgreSQL) or it cannot be written (a full disk): the caller must log it.

        Example::

            if not ledger.spill_submitted(intent.id, request_id, submitted_at):
                logger.error("request id %s is recorded nowhere", request_id)
        """
        path = self.spill_path
        if path is None:
            return False
        line = json.dumps(
            {
                "submission_id": submission_id,
                "request_id": request_id,
                "submitted_at": _aware(submitted_at, "submitted_at").isoformat(),
            }
        )
        try:
            with path.open("a", encoding="utf-8") as spill:
                spill.write(line + "\n")
                spill.flush()
                os.fsync(spill.fileno())
        except OSError as exc:
            logger.error("cannot keep request id %s in %s: %s", request_id, path, exc.strerror)
            return False
        return True

    def _replay_spill(self) -> None:
        """Record the request ids an earlier run spilled; keep the file if any fails."""
        path = self.spill_path
        if path is None or not path.exists():
            return
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return  # another process replayed and removed it
        for line in lines:
            try:
                kept = json.loads(line)
                at = datetime.fromisoformat(kept["submitted_at"])
                self.record_submitted(int(kept["submission_id"]), str(kept["request_id"]), at)
            except LedgerStateError:
                continue  # recorded already (the write landed after all), or it moved on
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash while it was written
            except LedgerUnavailableError as exc:
                logger.warning("cannot record the request ids kept in %s yet: %s", path, exc)
                return
        path.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        """The ledger URL with any password hidden."""
        return redact_database_url(self._url)

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._url.get_backend_name()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics; write only through the methods)."""
        return self._engine

    # -- plumbing -------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Make every write of this thread inside the block one transaction: one commit.

        The batch runner groups the writes of many rows this way (one fsync instead of
        one per write) and answers each row only after the commit, so an intent is
        still durable before its request leaves. A write that the ledger refuses
        (`LedgerStateError`) changes nothing and leaves the others in; any other failure
        rolls the whole block back.

        Example::

            with ledger.transaction():
                ledger.record_submitted(a.id, "job-1")
                ledger.record_finished(b.id, "completed", output_urls=["https://..."])
        """
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self._begin("cannot write to the ledger") as conn:
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    @contextmanager
    def _begin(self, failure: str = "ledger operation failed") -> Iterator[Connection]:
        if self._closed:
            raise LedgerError("the ledger is closed")
        active: Connection | None = getattr(self._local, "conn", None)
        try:
            if active is None:
                with self._engine.begin() as conn:
                    yield conn
            elif active.dialect.name == "postgresql":
                # A failed statement aborts a PostgreSQL transaction: isolate each write.
                with active.begin_nested():
                    yield active
            else:
                yield active
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            if getattr(getattr(exc, "orig", None), "pgcode", None) in _CONFLICT_CODES:
                raise LedgerConflictError(f"{failure}: {self._describe(exc)}") from exc
            raise LedgerUnavailableError(f"{failure}: {self._describe(exc)}") from exc

    def _describe(self, exc: SQLAlchemyError) -> str:
        orig = getattr(exc, "orig", None)
        lines = str(orig if orig is not None else exc).strip().splitlines()
        message = f"{type(orig or exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        password = self._url.password
        if password:
            message = message.replace(str(password), "***")
        return message

    def _update(
        self, submission_id: int, guard: str, values: Mapping[str, Any], action: str
    ) -> Submission:
        """Update attempt `submission_id` if `_GUARDS[guard]` holds.

        Statements are built once per shape (`_update_statements`) and run as
        `PreparedStatement`s: building SQLAlchemy expressions per call, and even
        SQLAlchemy's execution path, cost more CPU than the database itself.
        """
        subject = f"submission {submission_id}"
        names = tuple(sorted(values))
        statements = _update_statements(guard, names)
        params = {f"v_{name}": values[name] for name in names}
        params.update(
            k_value=submission_id, v_updated_at=_now(), g_request_id=values.get("request_id")
        )
        current: Any = None
        prepared, name = self._prepared.get, statements.name
        try:
            with self._begin(f"cannot {action} {subject}") as conn:
                before = None
                if statements.charge_before is not None:
                    charge = prepared(conn, name + ":charge", statements.charge_before)
                    before = charge.one_or_none(conn, params)
                row = prepared(conn, name, statements.update).one_or_none(conn, params)
                if row is not None and before is not None:
                    delta = (values["charge_usd"] or 0.0) - (before["charge_usd"] or 0.0)
                    if delta:
                        add = prepared(conn, "add_spend", _ADD_SPEND)
                        add.run(conn, {"delta": delta, "now": _now()})
                if row is None:
                    current = prepared(conn, name + ":current", statements.current)
                    current = current.one_or_none(conn, params)
        except IntegrityError as exc:
            raise LedgerStateError(
                f"cannot {action} {subject}: request id {values.get('request_id')!r} is "
                "already recorded for another submission"
            ) from exc
        if row is not None:
            return submission_from_row(row)
        if current is None:
            raise LedgerStateError(f"cannot {action} {subject}: no such submission")
        request_id, state = current["request_id"], current["state"]
        has_id = f"request id {request_id!r}" if request_id else "no request id"
        raise LedgerStateError(f"cannot {action} {subject}: it is in state {state!r} with {has_id}")

    # -- writes -------------------------------------------------------------------

    def record_intent(
        self, row_key: str, partition: str, row_id: str, request_hash: str
    ) -> Submission:
        """Record a new attempt for `row_key` in state ``intent``; call before sending.

        The attempt number is the previous maximum + 1, assigned in the same statement
        as the insert; concurrent writers for one key retry on the unique
        ``(row_key, attempt)`` constraint. Committed before returning.
        """
        for name, value in (("row_key", row_key), ("partition", partition), ("row_id", row_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        now = _now()
        next_attempt = (
            select(func.coalesce(func.max(_t.c.attempt), 0) + 1)
            .where(_t.c.row_key == row_key)
            .scalar_subquery()
        )
        stmt = (
            insert(_t)
            .values(
                row_key=row_key,
                partition=partition,
                row_id=row_id,
                request_hash=request_hash,
                attempt=next_attempt,
                state=SubmissionState.INTENT.value,
                intent_at=now,
                output_urls="[]",
                updated_at=now,
            )
            .returning(*_t.c)
        )
        for _ in range(INTENT_RETRIES):
            try:
                with self._begin(f"cannot record the intent for row {row_id!r}") as conn:
                    row = conn.execute(stmt).mappings().one()
            except IntegrityError:
                continue  # another writer took this attempt number; read the new max
            return submission_from_row(row)
        raise LedgerStateError(
            f"cannot record the intent for row {row_id!r}: {INTENT_RETRIES} concurrent "
            "writers kept taking the next attempt number"
        )

    def claim(
        self,
        requests: Iterable[ClaimRequest],
        *,
        holder: str,
        max_attempts: int,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        budget_usd: float | None = None,
        account_concurrency: int | None = None,
        refused_since: datetime | None = None,
    ) -> list[ClaimDecision]:
        """Decide, for each row, who pays: one transaction for the whole list.

        For every request the row's attempts are read and `claims.decide` applied under a
        lock no other runner can hold at the same time. A SUBMIT decision has already
        written the new intent, held by `holder` until ``now + lease_seconds`` (renew with
        `renew`), and reserved its price against `budget_usd`; with
        `account_concurrency`, it also took one of the account's slots (over every
        partition and runner sharing the ledger: intents with a live lease, and submitted
        jobs until they end). With `refused_since` (the run's start), a row that would be
        submitted gets ACCOUNT_REFUSED instead while an account refusal recorded since
        then is live (`record_account_refusal`); rows to follow or reuse are unaffected.
        Decisions come back in the order of `requests`.

        Example::

            [decision] = ledger.claim([ClaimRequest(key, "cats", "42", sha)],
                                      holder=runner_id, max_attempts=9)
        """
        wanted = list(requests)
        if not wanted:
            return []
        if not holder:
            raise ValueError("holder must be a non-empty string")
        keys = sorted({request.row_key for request in wanted})
        with self._begin("cannot claim rows in the ledger") as conn:
            now = _now()
            lease = _Lease(holder, now, now + timedelta(seconds=lease_seconds))
            self._lock_rows(conn, keys)
            account = self._claim_account(conn, now, budget_usd, account_concurrency, refused_since)
            history = self._attempts_of(conn, keys)
            spent_before = account.spent_usd
            decisions = [
                self._claim_row(
                    conn, request, history[request.row_key], account, lease, max_attempts
                )
                for request in wanted
            ]
            if account.spent_usd != spent_before:
                add = self._prepared.get(conn, "add_spend", _ADD_SPEND)
                add.run(conn, {"delta": account.spent_usd - spent_before, "now": now})
        return decisions

    def _lock_rows(self, conn: Connection, keys: list[str]) -> None:
        """On PostgreSQL, take each row key's advisory lock (in key order) until commit."""
        if conn.dialect.name == "postgresql":
            lock = self._prepared.get(conn, "advisory_lock", _ADVISORY_LOCK)
            for key in keys:
                lock.run(conn, {"key": _advisory_key(key)})

    def _claim_account(
        self,
        conn: Connection,
        now: datetime,
        budget_usd: float | None,
        concurrency: int | None,
        refused_since: datetime | None,
    ) -> AccountState:
        """The account as this claim sees it; the spend row is locked when it is checked."""
        prepared = self._prepared.get
        account = AccountState(budget_usd=budget_usd, concurrency=concurrency)
        if account.accounted:
            account.spent_usd = float(prepared(conn, "spent", _SPENT_FOR_UPDATE).scalar(conn, {}))
        if concurrency is not None:
            slots = prepared(conn, "open_slots", _OPEN_SLOTS)
            account.open_slots = int(slots.scalar(conn, _slot_params(now)))
        if refused_since is not None:
            since = _aware(refused_since, "refused_since")
            refusal = self._live_refusal(conn, now)
            if refusal is not None and refusal.applies_to(now, since):
                account.refusal = refusal
        return account

    def _attempts_of(self, conn: Connection, keys: list[str]) -> dict[str, list[Submission]]:
        """Every attempt of each key, oldest first (an empty list for a key never tried)."""
        history: dict[str, list[Submission]] = {key: [] for key in keys}
        if len(keys) == 1:
            # The runner claims one row at a time: an indexed look-up, prepared once.
            [key] = keys
            attempts_of_key = self._prepared.get(conn, "attempts_of_key", _ATTEMPTS_OF_KEY)
            rows: Iterable[Mapping[Any, Any]] = attempts_of_key.all(conn, {"key": key})
            history[key].extend(submission_from_row(row) for row in rows)
            return history
        for start in range(0, len(keys), LOOKUP_CHUNK_SIZE):
            chunk = keys[start : start + LOOKUP_CHUNK_SIZE]
            for row in conn.execute(_ATTEMPTS_OF_KEYS, {"keys": chunk}).mappings():
                history[row["row_key"]].append(submission_from_row(row))
        return history

    def _claim_row(
        self,
        conn: Connection,
        request: ClaimRequest,
        attempts: list[Submission],
        account: AccountState,
        lease: _Lease,
        max_attempts: int,
    ) -> ClaimDecision:
        """Apply `decide` to one row and write what it takes: an adoption or a new intent."""
        verdict = decide(attempts, holder=lease.holder, now=lease.now, max_attempts=max_attempts)
        action, attempt = verdict.action, verdict.attempt
        took_over = False
        if action is ClaimAction.FOLLOW and attempt is not None:
            if attempt.lease_until is None or attempt.lease_until <= lease.now:
                _adopt(conn, attempt.id, lease)  # its holder is gone: its slot counts again
        elif action is ClaimAction.SUBMIT:
            price = request.price_usd or 0.0
            action = account.admits(price)
            if action is ClaimAction.SUBMIT:
                dangling = verdict.dangling
                if dangling is not None and dangling.state is SubmissionState.INTENT:
                    _give_up_intent(conn, dangling.id, lease.now)
                took_over = dangling is not None
                attempt = self._insert_intent(conn, request, lease, attempts)
                attempts.append(attempt)
                account.reserve(price)
        refusal = account.refusal if action is ClaimAction.ACCOUNT_REFUSED else None
        return ClaimDecision(
            action,
            attempt,
            paid_attempts=verdict.paid_attempts,
            took_over=took_over,
            last_error=refusal.reason if refusal is not None else verdict.last_error,
            spent_usd=account.spent_usd if account.accounted else None,
        )

    def _insert_intent(
        self,
        conn: Connection,
        request: ClaimRequest,
        lease: _Lease,
        attempts: list[Submission],
    ) -> Submission:
        number = max((a.attempt for a in attempts), default=0) + 1
        values: dict[str, Any] = dict.fromkeys(c.name for c in _t.c if c.name != "id")
        values.update(
            row_key=request.row_key,
            partition=request.partition,
            row_id=request.row_id,
            request_hash=request.request_hash,
            attempt=number,
            state=SubmissionState.INTENT.value,
            intent_at=lease.now,
            output_urls="[]",
            updated_at=lease.now,
            holder=lease.holder,
            lease_until=lease.until,
            charge_usd=request.price_usd,
        )
        params = {f"v_{name}": value for name, value in values.items()}
        row = self._prepared.get(conn, "insert_intent", _INSERT_INTENT).one_or_none(conn, params)
        assert row is not None  # INSERT ... RETURNING answers the row it wrote
        return submission_from_row(row)

    def renew(self, holder: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> int:
        """Extend every open claim `holder` has; returns how many. The runner's heartbeat."""
        until = _now() + timedelta(seconds=lease_seconds)
        stmt = (
            update(_t).where(_t.c.holder == holder, _states(*OPEN_STATES)).values(lease_until=until)
        )
        with self._begin("cannot renew the runner's claims") as conn:
            return int(conn.execute(stmt).rowcount or 0)

    def adopt_orphaned_jobs(
        self, holder: str, lease_seconds: float = DEFAULT_LEASE_SECONDS, limit: int = 8
    ) -> list[Submission]:
        """Take over up to `limit` submitted jobs whose runner's lease has lapsed.

        Such a job still runs at the API and holds an account slot until someone records
        its end; a runner waiting for a slot adopts it (renewed by its heartbeat from now
        on), polls it to its end and records that, so a dead run's jobs cannot starve the
        account. One transaction: no two runners adopt the same job.

        Example::

            for job in ledger.adopt_orphaned_jobs(holder, lease_seconds=60):
                ...  # poll job.request_id, then record_finished(job.id, ...)
        """
        now = _now()
        lapsed = (
            _states(SubmissionState.SUBMITTED),
            _t.c.request_id.is_not(None),
            (_t.c.lease_until.is_(None)) | (_t.c.lease_until <= now),
        )
        with self._begin("cannot adopt orphaned jobs") as conn:
            ids = list(
                conn.execute(select(_t.c.id).where(*lapsed).order_by(_t.c.id).limit(limit))
                .scalars()
                .all()
            )
            if not ids:
                return []
            adopted = conn.execute(
                update(_t)
                .where(_t.c.id.in_(ids), *lapsed)
                .values(holder=holder, lease_until=now + timedelta(seconds=lease_seconds))
                .returning(*_t.c)
            ).mappings()
            return [submission_from_row(row) for row in adopted]

    def spent_usd(self) -> float:
        """The ledger's spend: every attempt's cost when reported, else its reserved price."""
        with self._begin("cannot read the ledger") as conn:
            value = conn.execute(select(_a.c.spent_usd).where(_ACCOUNT_ROW)).scalar_one()
        return float(value)

    def open_attempts(self) -> int:
        """The account's taken slots right now: intents with a live lease, and jobs
        submitted and not yet recorded finished (whether or not their runner lives)."""
        with self._begin("cannot read the ledger") as conn:
            return int(conn.execute(_OPEN_SLOTS, _slot_params(_now())).scalar_one())

    def record_account_refusal(
        self, reason: str, ttl_seconds: float = ACCOUNT_REFUSAL_TTL_SECONDS
    ) -> AccountRefusal:
        """Record that the API refused the account itself (no balance, bad token).

        Every run sharing the ledger that was running at this moment stops submitting
        (see `claim`'s `refused_since`) until `ttl_seconds` have passed; a run started
        later (after a top-up) tries again. Committed before returning.

        Example::

            ledger.record_account_refusal("account balance too low (400002): top up")
        """
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("reason must be a non-empty string")
        if not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds!r}")
        now = _now()
        refusal = AccountRefusal(reason, now, now + timedelta(seconds=ttl_seconds))
        with self._begin("cannot record the account's refusal") as conn:
            conn.execute(
                insert(_r).values(
                    reason=reason, recorded_at=refusal.recorded_at, expires_at=refusal.expires_at
                )
            )
        return refusal

    def account_refusal(self) -> AccountRefusal | None:
        """The latest account refusal that has not expired, or None.

        Example::

            if (refusal := ledger.account_refusal()) is not None:
                print(refusal.reason, "until", refusal.expires_at)
        """
        with self._begin("cannot read the ledger") as conn:
            return self._live_refusal(conn, _now())

    def _live_refusal(self, conn: Connection, now: datetime) -> AccountRefusal | None:
        row = self._prepared.get(conn, "latest_refusal", _LATEST_REFUSAL).one_or_none(
            conn, {"now": now}
        )
        if row is None:
            return None
        return AccountRefusal(str(row["reason"]), row["recorded_at"], row["expires_at"])

    def record_submitted(
        self, submission_id: int, request_id: str, submitted_at: datetime | None = None
    ) -> Submission:
        """Record the API's request id for an ``intent`` (or ``unknown``) attempt.

        Call the moment the submit's response arrives: once this returns, the request
        id is committed. Recording the same request id again is a no-op update.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        at = _aware(submitted_at, "submitted_at")
        return self._update(
            submission_id,
            "submit",
            {
                "state": SubmissionState.SUBMITTED.value,
                "request_id": request_id,
                "submitted_at": at,
            },
            "record the request id of",
        )

    def record_rejected(self, submission_id: int, error: str) -> Submission:
        """The API refused the submit (or it was never sent): no job exists, not paid.

        Only an answer that proves no job was created may lead here (see
        `flux2_pipeline.runcomfy.errors`); the attempt's reserved charge is released.
        """
        return self._update(
            submission_id,
            "reject",
            {
                "state": SubmissionState.REJECTED.value,
                "error": error,
                "finished_at": _now(),
                "holder": None,
                "charge_usd": 0.0,
            },
            "mark rejected",
        )

    def record_unknown(self, submission_id: int, error: str) -> Submission:
        """The submit's answer was lost: a job may exist (counts as paid), id unknown.

        The claim is released: a re-run may submit the row again, and counts that as a
        possible duplicate. The reserved charge stays spent.
        """
        return self._update(
            submission_id,
            "unknown",
            {"state": SubmissionState.UNKNOWN.value, "error": error, "holder": None},
            "mark unknown",
        )

    def record_finished(
        self,
        submission_id: int,
        state: SubmissionState | str,
        finished_at: datetime | None = None,
        error: str | None = None,
        cost_usd: float | None = None,
        output_urls: Iterable[str] = (),
    ) -> Submission:
        """Record the job's end: `state` is ``completed``, ``failed`` or ``cancelled``."""
        parsed = _finished_state(state)
        values: dict[str, Any] = {
            "state": parsed.value,
            "finished_at": _aware(finished_at, "finished_at"),
            "error": error,
            "cost_usd": None if cost_usd is None else float(cost_usd),
            "output_urls": json.dumps([str(u) for u in output_urls]),
        }
        if cost_usd is not None:
            # The API's own figure replaces the reserved price in the ledger's spend.
            values["charge_usd"] = float(cost_usd)
        elif parsed is SubmissionState.CANCELLED:
            # Cancelled with no cost reported: the API cancelled it before it ran (only
            # queued jobs can be cancelled), so it cost nothing and its price goes back.
            values["charge_usd"] = 0.0
        return self._update(submission_id, "finish", values, f"mark {parsed.value}")

    # -- reads ---------------------------------------------------------------------

    def lookup(self, row_keys: Iterable[str]) -> dict[str, RowHistory]:
        """Every attempt of each key that has any, in ``len(keys) / 500`` queries.

        Keys never attempted are absent from the result.
        """
        keys = sorted(set(row_keys))
        if not keys:
            return {}
        with self._begin("cannot read the ledger") as conn:
            history = self._attempts_of(conn, keys)
        return {key: RowHistory(tuple(attempts)) for key, attempts in history.items() if attempts}

    def submissions(self, partition: str | None = None) -> list[Submission]:
        """Every attempt (of one partition, if given), oldest first."""
        stmt = select(*_t.c).order_by(_t.c.id)
        if partition is not None:
            stmt = stmt.where(_t.c.partition == partition)
        with self._begin("cannot read the ledger") as conn:
            return [submission_from_row(row) for row in conn.execute(stmt).mappings()]

    def stats(self, partition: str | None = None) -> dict[str, int]:
        """Attempt counts by state (every state present, zero if none)."""
        stmt = select(_t.c.state, func.count()).group_by(_t.c.state)
        if partition is not None:
            stmt = stmt.where(_t.c.partition == partition)
        counts = {state.value: 0 for state in SubmissionState}
        with self._begin("cannot read the ledger") as conn:
            for state, count in conn.execute(stmt):
                counts[str(state)] = int(count)
        return counts
