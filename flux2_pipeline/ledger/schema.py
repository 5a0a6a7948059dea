"""The ledger's one table, its column types and the submission states.

SQLAlchemy Core only; the same `Table` serves SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

TABLE_NAME = "flux2_submissions"


class SubmissionState(StrEnum):
    """Where one submission attempt stands.

    `intent` is written before the HTTP submit is sent; `submitted` once the API returned
    a request id; `completed`, `failed`, `cancelled` are the job's end states. `rejected`
    means the API refused the submit (no job exists, nothing paid). `unknown` means the
    submit's answer was lost: a job may exist, so it counts as paid.
    """

    INTENT = "intent"
    SUBMITTED = "submitted"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    UNKNOWN = "unknown"


FINISHED_STATES = frozenset(
    {SubmissionState.COMPLETED, SubmissionState.FAILED, SubmissionState.CANCELLED}
)
# An `intent` left behind by a crash counts as paid: the request may have been sent.
UNPAID_STATES = frozenset({SubmissionState.REJECTED})
# States whose job is done or may still complete: never submit that row again.
LIVE_STATES = frozenset({SubmissionState.SUBMITTED, SubmissionState.COMPLETED})


def make_row_key(partition: str, row_id: str, request_fingerprint: str) -> str:
    """Stable key of one (partition, row, effective request): a sha256 hex digest.

    The parts are JSON-encoded as a list, so no choice of separator can make two
    different triples collide.

    Example::

        key = make_row_key("batch-01", "42", sha256_of_request_json)
    """
    payload = json.dumps([partition, row_id, request_fingerprint], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so values are stored as
    naive UTC text and tagged UTC again when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("ledger timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData()


def _id_column() -> Column[int]:
    # INTEGER PRIMARY KEY on SQLite is the rowid alias; BIGINT identity elsewhere.
    kind = BigInteger().with_variant(Integer(), "sqlite")
    return Column("id", kind, primary_key=True, autoincrement=True)


submissions = Table(
    TABLE_NAME,
    metadata,
    _id_column(),
    Column("row_key", String(64), nullable=False),
    Column("partition", Text(), nullable=False),
    Column("row_id", Text(), nullable=False),
    Column("request_hash", Text(), nullable=False),
    Column("attempt", Integer(), nullable=False),
    Column("state", String(16), nullable=False),
    Column("request_id", Text(), nullable=True),
    Column("intent_at", UTCDateTime(), nullable=False),
    Column("submitted_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("error", Text(), nullable=True),
    Column("cost_usd", Float(), nullable=True),
    Column("output_urls", Text(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    # The claim: which runner holds an open attempt, and until when its lease runs.
    Column("holder", Text(), nullable=True),
    Column("lease_until", UTCDateTime(), nullable=True),
    # What this attempt adds to the ledger's spend: its price while in flight, the
    # API's reported cost once known (see `ledger_account`).
    Column("charge_usd", Float(), nullable=True),
    # Also the row_key index (leading column) and the guard that makes record_intent
    # concurrency-safe: two writers computing the same next attempt cannot both win.
    UniqueConstraint("row_key", "attempt", name=f"uq_{TABLE_NAME}_row_key_attempt"),
    # NULLs are distinct on both backends: unique only where a request id is known.
    UniqueConstraint("request_id", name=f"uq_{TABLE_NAME}_request_id"),
    Index(f"ix_{TABLE_NAME}_partition", "partition"),
    # Open attempts (claims and account slots) are found without scanning history.
    Index(f"ix_{TABLE_NAME}_state_lease", "state", "lease_until"),
    Index(f"ix_{TABLE_NAME}_holder", "holder"),
)

ACCOUNT_TABLE_NAME = "flux2_ledger_account"

ledger_account = Table(
    ACCOUNT_TABLE_NAME,
    metadata,
    # One row (id 1): the spend of every attempt in the ledger, kept in step with
    # `charge_usd` in the same transactions, so a budget check reads one row.
    Column("id", Integer(), primary_key=True, autoincrement=False),
    Column("spent_usd", Float(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

REFUSALS_TABLE_NAME = "flux2_account_refusals"

account_refusals = Table(
    REFUSALS_TABLE_NAME,
    metadata,
    # One row per refusal the API gave for the whole account (no balance, bad token...),
    # so every runner sharing the ledger stops submitting until it expires. Rows are only
    # added: the latest one that has not expired is the account's state.
    _id_column(),
    Column("reason", Text(), nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index(f"ix_{REFUSALS_TABLE_NAME}_expires_at", "expires_at"),
)

OPEN_STATES = frozenset({SubmissionState.INTENT, SubmissionState.SUBMITTED})
"""States of an attempt that holds a claim on its row and a slot of the account.

An `intent` holds its slot while its holder's lease is live (its request may never have
left: when the holder dies, the slot is free once the lease runs out). A `submitted` job
holds its slot until it is recorded finished, whoever polls it: the API runs it whether
or not its runner is alive (see `claims.ORPHANED_JOB_SLOT_SECONDS` for the one bound)."""

ADDED_COLUMNS = ("holder", "lease_until", "charge_usd")
"""Columns added after the first release; `Ledger.open` adds them to older ledgers.

Tables added later (`ledger_account`, `account_refusals`) are created by `Ledger.open`
when missing, so a ledger written by any older release opens and migrates in place."""
