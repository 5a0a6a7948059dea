"""`flux2_pipeline.batch.ids`: given ids, derived ids, one namespace, kept on disk."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from flux2_pipeline.batch.ids import RowIdRegistry, derived_base, given_id

COLUMNS = ("id", "prompt", "image_urls")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, (None, None)),
        (float("nan"), (None, None)),
        (7, ("7", None)),
        (-3.0, ("-3", None)),
        ("  a b ", ("a b", None)),
        ("ünï", ("ünï", None)),
    ],
)
def test_given_ids(raw: Any, expected: tuple[str | None, str | None]) -> None:
    assert given_id(raw) == expected


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        (True, "string or an integer"),
        (Decimal("1.5"), "string or an integer"),
        (b"raw", "string or an integer"),
        ("   ", "must not be blank"),
        (0.5, "string or an integer"),
        (float("-inf"), "string or an integer"),
        (1e300, "2**53"),
    ],
)
def test_unusable_ids_name_the_column_and_the_rule(raw: Any, rule: str) -> None:
    text, problem = given_id(raw)
    assert text is None
    assert problem is not None and problem.startswith("id: ") and rule in problem


def test_a_huge_bad_id_is_quoted_short() -> None:
    _text, problem = given_id(["x" * 1_000_000])
    assert problem is not None and len(problem) < 200


def records(*ids: Any, prompt: str = "p") -> list[dict[str, Any]]:
    return [
        {"id": row_id, "prompt": prompt, "image_urls": ["https://x.test/a.png"]} for row_id in ids
    ]


def test_many_distinct_ids_get_no_false_duplicate_and_repeats_are_caught_across_batches() -> None:
    with RowIdRegistry(COLUMNS) as registry:
        for start in range(0, 50_000, 1000):
            batch = records(*(f"row-{i}" for i in range(start, start + 1000)))
            assert all(problem is None for _, problem in registry.assign_batch(batch))
        again = registry.assign_batch(records("row-49999", "row-0", "new", "new"))
    assert [row_id for row_id, _ in again] == ["row-49999", "row-0", "new", "new"]
    problems = [problem for _, problem in again]
    assert problems[2] is None
    assert all(p is not None and "duplicate" in p for p in (problems[0], problems[1], problems[3]))


def test_an_invalid_row_takes_no_id_from_the_others() -> None:
    record = records(None)[0]
    base = derived_base(record, COLUMNS)
    with RowIdRegistry(COLUMNS) as registry:
        bad, good = registry.assign_batch([{**record, "id": 0.5}, record])
    assert bad[0] == base and bad[1] is not None
    assert good == (base, None)


def test_the_index_lives_in_a_temporary_folder_that_close_removes() -> None:
    registry = RowIdRegistry(COLUMNS)
    folder = Path(registry._folder.name)
    assert (folder / "ids.sqlite").exists()
    registry.close()
    assert not folder.exists()
