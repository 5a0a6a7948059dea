"""Job latencies summed up in constant memory: an exact mean and sketched percentiles.

A DDSketch (Datadog's `ddsketch`) keeps log-spaced buckets, so every percentile is
within `RELATIVE_ACCURACY` of the exact one, and its bucket count is capped
(`MAX_BUCKETS`), so memory does not grow with the number of rows.

Example::

    >>> sketch = LatencySketch()
    >>> for seconds in (1.0, 2.0, 3.0, 4.0):
    ...     sketch.add(seconds)
    >>> sketch.mean, round(sketch.quantile(0.5), 1)
    (2.5, 2.0)
"""

from __future__ import annotations

from ddsketch import LogCollapsingLowestDenseDDSketch

RELATIVE_ACCURACY = 0.01
MAX_BUCKETS = 2048
"""At 1% accuracy, 2048 buckets span latencies from 1 ms to over 10^14 s: far beyond
any job; only the very lowest ones would be merged should it ever be reached."""


class LatencySketch:
    """A running count, exact mean and approximate percentiles of latencies (seconds).

    `quantile(q)` is the value of rank `q * (count - 1)` in sorted order, within 1%.
    """

    def __init__(self) -> None:
        self._sketch = LogCollapsingLowestDenseDDSketch(
            relative_accuracy=RELATIVE_ACCURACY, bin_limit=MAX_BUCKETS
        )

    def add(self, seconds: float) -> None:
        """Count one latency; negative values (clock steps) count as 0."""
        self._sketch.add(max(0.0, seconds))

    @property
    def count(self) -> int:
        """How many latencies were added."""
        return int(self._sketch.count)

    @property
    def mean(self) -> float | None:
        """The exact mean, or None before the first latency."""
        return float(self._sketch.avg) if self.count else None

    def quantile(self, q: float) -> float | None:
        """The `q`-quantile (0 <= q <= 1) within 1%, or None before the first latency."""
        if not self.count:
            return None
        value = self._sketch.get_quantile_value(q)
        return None if value is None else float(value)
