"""The durable record of paid API submissions (SQLAlchemy Core; SQLite or PostgreSQL).

One row per submission attempt, keyed by `make_row_key(partition, row_id, fingerprint)`.
No Dagster inside.

Example::

    from flux2_pipeline.ledger import Ledger, make_row_key

    with Ledger.open("data/output/ledger.db") as ledger:
        key = make_row_key("batch-01", "42", request_sha256)
        history = ledger.lookup([key]).get(key)
"""

from flux2_pipeline.ledger.claims import (
    ACCOUNT_REFUSAL_TTL_SECONDS,
    DEFAULT_LEASE_SECONDS,
    ORPHANED_JOB_SLOT_SECONDS,
    AccountRefusal,
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
from flux2_pipeline.ledger.records import RowHistory, Submission
from flux2_pipeline.ledger.schema import (
    FINISHED_STATES,
    LIVE_STATES,
    OPEN_STATES,
    TABLE_NAME,
    UNPAID_STATES,
    SubmissionState,
    make_row_key,
)
from flux2_pipeline.ledger.store import LOOKUP_CHUNK_SIZE, Ledger
from flux2_pipeline.ledger.url import parse_ledger_url, redact_database_url

__all__ = [
    "ACCOUNT_REFUSAL_TTL_SECONDS",
    "DEFAULT_LEASE_SECONDS",
    "FINISHED_STATES",
    "LIVE_STATES",
    "LOOKUP_CHUNK_SIZE",
    "OPEN_STATES",
    "ORPHANED_JOB_SLOT_SECONDS",
    "TABLE_NAME",
    "UNPAID_STATES",
    "AccountRefusal",
    "ClaimAction",
    "ClaimDecision",
    "ClaimRequest",
    "Ledger",
    "LedgerConfigError",
    "LedgerConflictError",
    "LedgerError",
    "LedgerStateError",
    "LedgerUnavailableError",
    "RowHistory",
    "Submission",
    "SubmissionState",
    "decide",
    "make_row_key",
    "parse_ledger_url",
    "redact_database_url",
]
