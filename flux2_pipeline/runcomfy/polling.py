"""The poll schedule: how long to wait before asking a job's status again.

The wait grows with the job's age: `fraction` of the time elapsed since submit,
never below `min_interval` and never above `max_interval`. So the lag between a
job finishing and the client noticing is at most about `fraction` of the job's
duration (or `min_interval` for short jobs), while a job of age t costs only
about log(t)/fraction status calls. With the defaults a 0.5 s job is noticed
within 0.1 s (5 calls), a 30 s job within 4.5 s (34 calls), and a job
queued for ten minutes is asked every 5 s, not hammered.

`FinishForecast` sharpens that where jobs take about as long as the ones before them:
one status call is aimed just after the job's expected end, learned from the API's
own timestamps of the jobs that completed before it.

Example::

    >>> schedule = PollSchedule(min_interval=0.1, max_interval=5.0, fraction=0.15)
    >>> [round(schedule.interval(t), 2) for t in (0.0, 1.0, 10.0, 100.0)]
    [0.1, 0.15, 1.5, 5.0]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime
from statistics import median
from urllib.parse import urlsplit

from flux2_pipeline.runcomfy.security import is_loopback_host


@dataclass(frozen=True, slots=True)
class PollSchedule:
    """Adaptive poll interval: `fraction` of the job's age, clamped to [min, max]."""

    min_interval: float = 0.1
    max_interval: float = 5.0
    fraction: float = 0.15

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("PollSchedule needs 0 < min_interval <= max_interval")
        if self.fraction < 0:
            raise ValueError("PollSchedule.fraction must be >= 0")

    @classmethod
    def for_base_url(cls, base_url: str) -> PollSchedule:
        """The default schedule for an API at `base_url`: quick on loopback (the emulator),
        polite against a real host (`REMOTE_POLL`).

        >>> PollSchedule.for_base_url("https://model-api.runcomfy.net") == REMOTE_POLL
        True
        """
        host = urlsplit(base_url).hostname or ""
        return LOCAL_POLL if is_loopback_host(host) else REMOTE_POLL

    def interval(self, elapsed: float) -> float:
        """Seconds to wait before the next status call for a job `elapsed` seconds old."""
        return min(self.max_interval, max(self.min_interval, self.fraction * elapsed))

    def calls_needed(self, duration: float) -> int:
        """Status calls this schedule makes for a job that takes `duration` seconds.

        Benchmarks compare the calls actually made against this figure.
        """
        elapsed, calls = 0.0, 0
        while True:
            elapsed += self.interval(elapsed)
            calls += 1
            if elapsed >= duration:
                return calls


LOCAL_POLL = PollSchedule()
"""Against the emulator on loopback: a 0.5 s job is noticed within 0.1 s."""

REMOTE_POLL = PollSchedule(min_interval=1.0, max_interval=5.0, fraction=0.4)
"""Against a real host: about once a second at first, then 40% of the job's age, at most
every 5 s (RunComfy's own clients poll every 2 to 5 s). A 20 s job costs 9 status calls
(`calls_needed(20)`), a 60 s job 17, and its end is noticed at most 5 s late."""

FORECAST_WINDOW = 64
"""Completed jobs the forecast remembers: recent enough to follow a queue that grows."""
FORECAST_MIN_JOBS = 3
"""Completed jobs seen before the forecast aims a poll at all."""
FORECAST_MARGIN = 0.01
"""Fraction of the forecast added to it (at least `FORECAST_MARGIN_MIN_S`), so that the
aimed status call reaches the API just after the job's end, not just before it."""
FORECAST_MARGIN_MIN_S = 0.005


class FinishForecast:
    """When a job is expected to end, learned from the jobs that completed before it.

    The fixed schedule notices a job's end up to `fraction` of its age late (65 ms for a
    1 s job, up to 4.5 s for a 30 s one), and while a job's successor waits for that,
    the account holds a slot it does not use. The API stamps each job with `created_at`
    and `finished_at`; their difference is how long it took from submit to its end,
    queue included, on the API's own clock (so no clock skew between it and this host).
    The median over the last `FORECAST_WINDOW` completed jobs is the forecast: `wait`
    makes one status call at the forecast (plus a small margin) after the submit left,
    in place of the scheduled call that would have come later. A job that ends before
    the forecast is still noticed by the schedule; one that ends after it costs at most
    one more status call. Without the API's timestamps nothing changes.

    >>> forecast = FinishForecast()
    >>> from datetime import datetime, timedelta, UTC
    >>> start = datetime(2026, 11, 25, tzinfo=UTC)
    >>> for seconds in (0.9, 1.0, 1.0, 1.2):
    ...     forecast.observe(start, start + timedelta(seconds=seconds))
    >>> round(forecast.seconds() or 0, 3)
    1.01
    """

    def __init__(self, window: int = FORECAST_WINDOW) -> None:
        self._durations: deque[float] = deque(maxlen=window)

    def observe(self, created_at: datetime | None, finished_at: datetime | None) -> None:
        """Learn from one completed job's timestamps (ignored when either is missing)."""
        if created_at is None or finished_at is None:
            return
        seconds = (finished_at - created_at).total_seconds()
        if seconds >= 0:
            self._durations.append(seconds)

    def seconds(self) -> float | None:
        """Seconds after its submit a new job is expected to have ended, margin included;
        None until `FORECAST_MIN_JOBS` jobs completed."""
        if len(self._durations) < FORECAST_MIN_JOBS:
            return None
        expected = median(self._durations)
        return expected + max(FORECAST_MARGIN_MIN_S, FORECAST_MARGIN * expected)
