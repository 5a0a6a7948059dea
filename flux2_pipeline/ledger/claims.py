"""Claims: which runner may pay for a row right now, decided from the row's history.

A claim is an open attempt (`intent` or `submitted`) with a `holder` and a `lease_until`
(docs/ledger.md, "Claims"). `decide` is the pure rule; `Ledger.claim` applies it inside
one locked transaction, so two runners can never both be told to submit.

Example::

    [decision] = ledger.claim(
        [ClaimRequest(key, "cats", "42", fingerprint)], holder="run-7", max_attempts=9
    )
    match decision.action:
        case ClaimAction.SUBMIT: ...   # decision.attempt is our intent: send the request
        case ClaimAction.FOLLOW: ...   # poll decision.attempt.request_id, never resubmit
        case ClaimAction.WAIT: ...     # another live runner is submitting it: ask again soon
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from flux2_pipeline.ledger.records import Submission
from flux2_pipeline.ledger.schema import SubmissionState

DEFAULT_LEASE_SECONDS = 60.0
"""How long a claim outlives its holder's last heartbeat (holders renew every third of it)."""

ORPHANED_JOB_SLOT_SECONDS = 1800.0
"""How long a `submitted` job nobody holds keeps its account slot, from its submit.

A job whose runner died still runs at the API, so it keeps its slot after its holder's
lease ran out, until a run that follows it (the partition's re-run) records its end.
Only a job nobody follows again gives its slot back, this long after it was submitted
(the API client's default job deadline), so that it cannot block the account for ever."""

ACCOUNT_REFUSAL_TTL_SECONDS = 600.0
"""How long an account-level refusal recorded in the ledger stops new submits."""


class ClaimAction(StrEnum):
    """What a runner must do with a row after asking the ledger."""

    SUBMIT = "submit"
    """A new attempt was recorded and is held by the caller: send the request now."""
    REUSE = "reuse"
    """A job of this row completed with images: use it, pay nothing."""
    FOLLOW = "follow"
    """A job of this row may still complete: poll it, never submit again."""
    WAIT = "wait"
    """Another live runner holds an intent without a request id yet: ask again soon."""
    WAIT_FOR_SLOT = "wait_for_slot"
    """The account's concurrency cap is reached: ask again when a job ends."""
    EXHAUSTED = "exhausted"
    """The row used every paid attempt it is allowed."""
    OVER_BUDGET = "over_budget"
    """Paying for this row would take the ledger's spend over its budget."""
    ACCOUNT_REFUSED = "account_refused"
    """The API refused the account (no balance, bad token) since this run began: do not
    submit; `ClaimDecision.last_error` is the refusal's reason."""


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One row a runner wants to pay for.

    `price_usd` is what the job is expected to cost (price per image x images), reserved
    against the budget from the moment the intent is written; None when unknown.
    """

    row_key: str
    partition: str
    row_id: str
    request_hash: str
    price_usd: float | None = None


@dataclass(frozen=True, slots=True)
class ClaimDecision:
    """The ledger's answer for one `ClaimRequest`.

    `attempt` is the new intent (SUBMIT), the completed attempt (REUSE), the job to poll
    (FOLLOW), the other runner's intent (WAIT) or the latest attempt (EXHAUSTED).
    `took_over` is True when SUBMIT replaces an intent or unknown outcome whose request
    may have reached the API: a possible duplicate, to be counted.
    """

    action: ClaimAction
    attempt: Submission | None = None
    paid_attempts: int = 0
    took_over: bool = False
    last_error: str | None = None
    spent_usd: float | None = None


@dataclass(frozen=True, slots=True)
class AccountRefusal:
    """An account-level refusal shared through the ledger, live until `expires_at`.

    Example::

        refusal = ledger.account_refusal()
        if refusal is not None:
            print(f"the account was refused at {refusal.recorded_at}: {refusal.reason}")
    """

    reason: str
    recorded_at: datetime
    expires_at: datetime

    def applies_to(self, now: datetime, refused_since: datetime) -> bool:
        """True while live, for a run that began at or before the refusal was recorded.

        >>> from datetime import UTC, timedelta
        >>> t = datetime(2026, 1, 1, 12, tzinfo=UTC)
        >>> refusal = AccountRefusal("no balance", t, t + timedelta(minutes=10))
        >>> refusal.applies_to(t + timedelta(minutes=1), refused_since=t - timedelta(hours=1))
        True
        >>> refusal.applies_to(t + timedelta(minutes=1), refused_since=t + timedelta(seconds=1))
        False
        """
        return self.expires_at > now and self.recorded_at >= refused_since


@dataclass(slots=True)
class AccountState:
    """The account as one claim sees it: spend, taken slots, a live refusal, and its caps.

    `Ledger.claim` reads it under its lock and `reserve`s each row it submits, so the
    rows of one claim are checked against each other as well.

    >>> account = AccountState(spent_usd=9.9, budget_usd=10.0)
    >>> account.admits(0.05), account.admits(0.2)
    (<ClaimAction.SUBMIT: 'submit'>, <ClaimAction.OVER_BUDGET: 'over_budget'>)
    """

    spent_usd: float = 0.0
    open_slots: int = 0
    refusal: AccountRefusal | None = None
    budget_usd: float | None = None
    concurrency: int | None = None

    @property
    def accounted(self) -> bool:
        """True when a budget or an account-wide cap is checked (the spend row is locked)."""
        return self.budget_usd is not None or self.concurrency is not None

    def admits(self, price_usd: float) -> ClaimAction:
        """SUBMIT when a row costing `price_usd` may be sent now, else why it may not."""
        if self.refusal is not None:
            return ClaimAction.ACCOUNT_REFUSED
        if self.concurrency is not None and self.open_slots >= self.concurrency:
            return ClaimAction.WAIT_FOR_SLOT
        if self.budget_usd is not None and self.spent_usd + price_usd > self.budget_usd + 1e-9:
            return ClaimAction.OVER_BUDGET
        return ClaimAction.SUBMIT

    def reserve(self, price_usd: float) -> None:
        """Count a submitted row: its price is spent and it takes a slot."""
        self.spent_usd += price_usd
        self.open_slots += 1


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `decide` concluded before any write: the action and the attempt it is about."""

    action: ClaimAction
    attempt: Submission | None
    paid_attempts: int
    dangling: Submission | None = None
    """An intent or unknown outcome that SUBMIT supersedes (the possible duplicate)."""
    last_error: str | None = None


def decide(
    attempts: tuple[Submission, ...] | list[Submission],
    *,
    holder: str,
    now: datetime,
    max_attempts: int,
) -> Verdict:
    """The claim rule for one row, given every recorded attempt (oldest first).

    Example::

        verdict = decide(history.attempts, holder="run-7", now=utcnow(), max_attempts=9)
    """
    paid = sum(1 for attempt in attempts if attempt.is_paid)
    last_error = next((a.error for a in reversed(attempts) if a.error), None)
    for attempt in reversed(attempts):
        if attempt.state is SubmissionState.COMPLETED and attempt.output_urls:
            return Verdict(ClaimAction.REUSE, attempt, paid)
    latest = attempts[-1] if attempts else None
    dangling: Submission | None = None
    if latest is not None and latest.request_id is not None:
        if latest.state is SubmissionState.SUBMITTED:
            return Verdict(ClaimAction.FOLLOW, latest, paid)
    elif latest is not None and latest.state is SubmissionState.INTENT:
        if latest.holder is not None and latest.holder != holder and _alive(latest, now):
            return Verdict(ClaimAction.WAIT, latest, paid)
        dangling = latest
    elif latest is not None and latest.state is SubmissionState.UNKNOWN:
        dangling = latest
    if paid >= max_attempts:
        return Verdict(ClaimAction.EXHAUSTED, latest, paid, last_error=last_error)
    return Verdict(ClaimAction.SUBMIT, None, paid, dangling=dangling, last_error=last_error)


def _alive(attempt: Submission, now: datetime) -> bool:
    return attempt.lease_until is not None and attempt.lease_until > now
