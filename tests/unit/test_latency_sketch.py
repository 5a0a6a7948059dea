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


def memory_after(count: int) -> int:
    """Bytes still allocated by a sketch that took `count` latencies (tracemalloc)."""
    rng = random.Random(3)
    values = (rng.uniform(0.5, 120.0) for _ in range(count))
    tracemalloc.start()
    try:
        sketch = LatencySketch()
        for value in values:
            sketch.add(value)
        size, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sketch.count == count
    return size


def test_memory_depends_on_the_spread_of_latencies_not_their_number() -> None:
    assert memory_after(200_000) <= memory_after(1_000) * 1.1 + 4096
