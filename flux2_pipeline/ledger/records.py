"""Immutable views of ledger rows: one `Submission` per attempt, a `RowHistory` per row."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flux2_pipeline.ledger.errors import LedgerError
from flux2_pipeline.ledger.schema import (
    FINISHED_STATES,
    LIVE_STATES,
    UNPAID_STATES,
    SubmissionState,
)


@dataclass(frozen=True, slots=True)
class Submission:
    """One submission attempt of one row, as stored.

    Timestamps are aware UTC datetimes; `output_urls` is empty unless the job completed.
    """

    id: int
    row_key: str
    partition: str
    row_id: str
    request_hash: str
    attempt: int
    state: SubmissionState
    request_id: str | None
    intent_at: datetime
    submitted_at: datetime | None
    finished_at: datetime | None
    error: str | None
    cost_usd: float | None
    output_urls: tuple[str, ...]
    updated_at: datetime
    holder: str | None = None
    """The runner whose claim this open attempt is (None once it ended)."""
    lease_until: datetime | None = None
    """When the holder's claim lapses unless its heartbeat renews it."""
    charge_usd: float | None = None
    """What this attempt adds to the ledger's spend (price while in flight, cost once known)."""

    @property
    def is_paid(self) -> bool:
        """True unless the API refused the submit (an `intent` may have been sent)."""
        return self.state not in UNPAID_STATES

    @property
    def is_finished(self) -> bool:
        """True once the job ended completed, failed or cancelled."""
        return self.state in FINISHED_STATES


def parse_state(value: str) -> SubmissionState:
    """The one place a stored state string becomes a `SubmissionState`."""
    try:
        return SubmissionState(value)
    except ValueError:
        raise LedgerError(f"the ledger holds an unknown submission state {value!r}") from None


def submission_from_row(row: Mapping[Any, Any]) -> Submission:
    urls = json.loads(row["output_urls"]) if row["output_urls"] else []
    return Submission(
        id=int(row["id"]),
        row_key=row["row_key"],
        partition=row["partition"],
        row_id=row["row_id"],
        request_hash=row["request_hash"],
        attempt=int(row["attempt"]),
        state=parse_state(row["state"]),
        request_id=row["request_id"],
        intent_at=row["intent_at"],
        submitted_at=row["submitted_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        cost_usd=None if row["cost_usd"] is None else float(row["cost_usd"]),
        output_urls=tuple(str(u) for u in urls),
        updated_at=row["updated_at"],
        holder=row.get("holder"),
        lease_until=row.get("lease_until"),
        charge_usd=None if row.get("charge_usd") is None else float(row["charge_usd"]),
    )


@dataclass(frozen=True, slots=True)
class RowHistory:
    """Every attempt recorded for one row key, ordered by attempt number (never empty).

    Example::

        history = ledger.lookup([key]).get(key)
        if history is None:
            ...  # never attempted: submit
        elif (job := history.live) is not None:
            ...  # poll or reuse job.request_id; never submit again
        elif history.dangling_intent is not None:
            ...  # a crash or lost answer: resubmitting may duplicate a paid job
        elif history.paid_attempts < max_attempts:
            ...  # earlier jobs failed or were cancelled: submit again
    """

    attempts: tuple[Submission, ...]

    def __post_init__(self) -> None:
        if not self.attempts:
            raise ValueError("a RowHistory holds at least one attempt")

    @property
    def row_key(self) -> str:
        return self.attempts[0].row_key

    @property
    def latest(self) -> Submission:
        """The most recent attempt."""
        return self.attempts[-1]

    @property
    def paid_attempts(self) -> int:
        """Attempts that may have cost money: all but `rejected` (a crashed `intent` counts)."""
        return sum(1 for a in self.attempts if a.is_paid)

    @property
    def live(self) -> Submission | None:
        """The latest attempt with a request id that is `submitted` or `completed`.

        That job has finished well or may still do so: poll or reuse it, never resubmit.
        """
        for attempt in reversed(self.attempts):
            if attempt.request_id is not None and attempt.state in LIVE_STATES:
                return attempt
        return None

    @property
    def completed(self) -> Submission | None:
        """The latest `completed` attempt, if any."""
        for attempt in reversed(self.attempts):
            if attempt.state is SubmissionState.COMPLETED:
                return attempt
        return None

    @property
    def dangling_intent(self) -> Submission | None:
        """The latest attempt when it is `intent` or `unknown` without a request id.

        A process died (or the submit's answer was lost) between writing the intent and
        learning the request id: a job may exist that the ledger cannot name.
        """
        latest = self.latest
        if latest.request_id is None and latest.state in (
            SubmissionState.INTENT,
            SubmissionState.UNKNOWN,
        ):
            return latest
        return None
