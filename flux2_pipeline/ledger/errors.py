"""One exception tree for everything the ledger can raise.

    LedgerError                  base of every ledger error
    ├── LedgerConfigError        the ledger URL is malformed or names an unsupported database
    ├── LedgerUnavailableError   the database cannot be reached or refused an operation
    │   └── LedgerConflictError  rolled back to break a deadlock with another writer: retry
    └── LedgerStateError         a write that would break the ledger's rules (unknown
                                 submission, a transition the state machine forbids, a
                                 request id already recorded for another submission)

No message ever contains the password of the ledger URL: URLs are rendered with
`redact_database_url`, and database errors are chained, not formatted into the message.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the ledger raises."""


class LedgerConfigError(LedgerError, ValueError):
    """The ledger URL is malformed or unsupported; the message is one line."""


class LedgerUnavailableError(LedgerError):
    """The database could not be reached, or failed an operation (disk full, locked...)."""


class LedgerConflictError(LedgerUnavailableError):
    """The database rolled the transaction back to break a deadlock (or a serialization
    conflict) with another writer; nothing of it was written, and running it again is safe."""


class LedgerStateError(LedgerError):
    """A write the ledger refuses: unknown submission id or a forbidden state transition."""
