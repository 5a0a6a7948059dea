"""The retry policy as pure functions: what is retryable, how long to wait.

A paid POST (submit) is retried only when the API surely created no job: the
connection was refused before anything was sent, or the API answered 429. Every
answer that does not prove "no job" becomes `SubmissionOutcomeUnknown` upstream
(`errors.submit_error_proves_no_job` states the rule), never a blind resubmit.

Example::

    >>> policy = RetryPolicy(max_attempts=4, base_delay=0.5, max_delay=4.0)
    >>> 0.0 <= policy.delay(attempt=2, retry_after=None) <= 2.0
    True
    >>> policy.delay(attempt=0, retry_after=3.0) >= 3.0
    True
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from flux2_pipeline.runcomfy.errors import (
    RateLimitError,
    RunComfyError,
    ServerError,
    SubmissionOutcomeUnknown,
    TransportError,
)

RETRYABLE_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP answers worth another try for reads and cancels (status, result, cancel)."""

SUBMIT_RETRYABLE_STATUS_CODES = frozenset({429})
"""HTTP answers to a submit worth another try: those that prove no job exists and may pass."""

RETRY_AFTER_JITTER = 0.1
"""Fraction of Retry-After added at random so throttled clients do not return in lockstep."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry one HTTP call.

    `max_attempts` counts every try, the first included. Delays use exponential
    backoff with full jitter (uniform in [0, min(max_delay, base_delay * 2**attempt)]),
    unless the server sent Retry-After, which wins (capped at `max_retry_after`).
    """

    max_attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 8.0
    max_retry_after: float = 60.0

    def delay(
        self,
        attempt: int,
        retry_after: float | None,
        rng: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to sleep before try number `attempt + 1` (attempt 0 is the first retry)."""
        if retry_after is not None and retry_after >= 0:
            wait = min(retry_after, self.max_retry_after)
            return wait + wait * RETRY_AFTER_JITTER * rng()
        return backoff_ceiling(attempt, self.base_delay, self.max_delay) * rng()

    def allows_another(self, attempts_made: int) -> bool:
        """True while fewer than `max_attempts` tries have been made."""
        return attempts_made < self.max_attempts


def backoff_ceiling(attempt: int, base_delay: float, max_delay: float) -> float:
    """The upper bound of the jittered wait before retry `attempt` (0-based)."""
    return min(max_delay, base_delay * 2.0 ** max(0, attempt))


def is_retryable(error: RunComfyError, *, submit: bool) -> bool:
    """Whether `error` may be retried; `submit=True` for the paid POST.

    >>> is_retryable(TransportError("refused", sent=False), submit=True)
    True
    >>> is_retryable(SubmissionOutcomeUnknown("read timeout"), submit=True)
    False
    """
    if isinstance(error, SubmissionOutcomeUnknown):
        return False
    if isinstance(error, TransportError):
        return not error.sent or not submit
    if isinstance(error, RateLimitError):
        return True
    if isinstance(error, ServerError):
        # A RunComfy code's family stands for the status: 500001 under HTTP 200 is a 500.
        status = error.family
        if submit:
            return status in SUBMIT_RETRYABLE_STATUS_CODES
        return status in RETRYABLE_STATUS_CODES
    return False


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds (fractions allowed) or an HTTP date.

    >>> parse_retry_after("2"), parse_retry_after("0.05"), parse_retry_after("soon")
    (2.0, 0.05, None)
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


def is_retryable_status(status: int) -> bool:
    """True for HTTP statuses worth asking again on a read (throttling, server errors).

    The downloader and the guarded fetcher use it for GETs of images.

    >>> is_retryable_status(503), is_retryable_status(404)
    (True, False)
    """
    return status in RETRYABLE_STATUS_CODES
