"""The poll schedule: how long to wait before asking a job's status again.

The wait grows with the job's age: `fraction` of the time elapsed since submit,
never below `min_interval` and never above `max_interval`. So the lag between a
job finishing and the client noticing is at most about `fraction` of the job's
duration (or `min_interval` for short jobs), while a job of age t costs only
about log(t)/fraction status calls. With the defaults a 0.5 s job is noticed
within 0.1 s (5 calls), a 30 s job within 4.5 s (34 calls), and a job
queued for ten minutes is asked every 5 s, not hammered.

Example::

    >>> schedule = PollSchedule(min_interval=0.1, max_interval=5.0, fraction=0.15)
    >>> [round(schedule.interval(t), 2) for t in (0.0, 1.0, 10.0, 100.0)]
    [0.1, 0.15, 1.5, 5.0]
"""

from __future__ import annotations

from dataclasses import dataclass


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
