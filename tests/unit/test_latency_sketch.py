"""`LatencySketch` against exact percentiles, and its memory against the row count."""

from __future__ import annotations

import math
import random
import tracemalloc

import pytest

from flux2_pipeline.batch.latency import RELATIVE_ACCURACY, LatencySketch


def exact_bounds(ordered: list[float], q: float) -> tuple[float, float]:
    rank = q * (len(ordered) - 1)
    return ordered[math.floor(rank)], ordered[math.ceil(rank)]


@pytest.mark.parametrize(
    "draw",
    [
        lambda rng: rng.lognormvariate(0.0, 1.5),
        lambda rng: rng.uniform(0.001, 600.0),
        lambda rng: rng.choice([0.0, 0.0, 0.5, 30.0]),
        lambda rng: 2.0,
    ],
    ids=["lognormal", "uniform", "with-zeros", "constant"],
)
def test_percentiles_are_within_the_relative_accuracy_of_exact_ones(draw: object) -> None:
    rng = random.Random(7)
    values = [draw(rng) for _ in range(20_000)]  # type: ignore[operator]
    sketch = LatencySketch()
    for value in values:
        sketch.add(value)
    ordered = sorted(values)
    assert sketch.count == len(values)
    assert sketch.mean == pytest.approx(sum(values) / len(values), rel=1e-9)
    for q in (0.0, 0.5, 0.9, 0.95, 0.99, 1.0):
        low, high = exact_bounds(ordered, q)
        got = sketch.quantile(q)
        assert got is not None
        assert low * (1 - RELATIVE_ACCURACY) - 1e-12 <= got <= high * (1 + RELATIVE_ACCURACY), q


def test_an_empty_sketch_has_no_figures() -> None:
    sketch = LatencySketch()
    assert (sketch.count, sketch.mean, sketch.quantile(0.95)) == (0, None, None)


def test_negative_latencies_count_as_zero() -> None:
    sketch = LatencySketch()
    sketch.add(-0.5)
    assert sketch.quantile(0.5) == 0.0


SKETCH_CODE = [tracemalloc.Filter(True, "*/ddsketch/*"), tracemalloc.Filter(True, "*/latency.py")]
"""Where the sketch's own blocks are allocated: other threads' and the interpreter's are not."""


def memory_after(count: int) -> int:
    """Bytes the sketch's own code still holds after taking `count` latencies (tracemalloc).

    Only blocks allocated by the sketch's code count: the whole process's traced size also
    moved with whatever another thread (a previous test's server) allocated meanwhile.
    """
    rng = random.Random(3)
    values = (rng.uniform(0.5, 120.0) for _ in range(count))
    tracemalloc.start()
    try:
        sketch = LatencySketch()
        for value in values:
            sketch.add(value)
        snapshot = tracemalloc.take_snapshot().filter_traces(SKETCH_CODE)
    finally:
        tracemalloc.stop()
    assert sketch.count == count
    return sum(stat.size for stat in snapshot.statistics("filename"))


def test_memory_depends_on_the_spread_of_latencies_not_their_number() -> None:
    # 20,000 latencies already fill every bucket of this spread (at 1,000 some low ones are
    # still empty, and each bucket filled later is a float of its own). A first sketch in a
    # process also allocates once what later ones reuse (2.4 KB measured): made here first.
    memory_after(1_000)
    large, small = memory_after(200_000), memory_after(20_000)
    assert large <= small * 1.1 + 4096


def test_memory_after_counts_what_the_sketch_holds() -> None:
    """The measure above can fail: it sees a sketch that keeps every value."""

    class Keeping(LatencySketch):
        def __init__(self) -> None:
            super().__init__()
            self.kept: list[float] = []

        def add(self, seconds: float) -> None:
            super().add(seconds)
            self.kept.append(seconds * 1.0)

    tracemalloc.start()
    try:
        keeping = Keeping()
        for index in range(10_000):
            keeping.add(index + 0.5)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, __file__), *SKETCH_CODE]
        )
    finally:
        tracemalloc.stop()
    assert sum(stat.size for stat in snapshot.statistics("filename")) > 10_000 * 24
