"""Asset checks on `flux2_edits`, each read back from a partition's written results file.

They run inside the `flux2_edits` step (`check_specs`): a partition's checks are evaluated
as soon as its results file is written, while the other partitions of a ranged run still
wait on the API, so they add no step of their own. Selected alone (the UI's "Execute" on a
check), the step only evaluates them.

Each check streams the file in record batches and keeps only counts and its first
examples; request ids are checked for repeats in a temporary on-disk index. So a check
runs in the same memory whatever the partition's row count (reading whole columns took
the peak RSS of `flux2-pipeline materialize` from 281 to 338 MB between 10k and 100k rows).

Example: in the Dagster UI each partition of flux2_edits shows these four checks;
`evaluate_edits_checks(storage, keys.edits, "cats", {"no_invalid_rows"})` evaluates one.
"""

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    DynamicPartitionsDefinition,
)

from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.paths import ScratchDatabase, iter_parquet
from flux2_pipeline.resources import Flux2Storage

EXAMPLES = 5


def _results(storage: Flux2Storage, key: str, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    return iter_parquet(storage.results_path(key), columns)


def _matching(
    batches: Iterable[pa.RecordBatch], where: Callable[[pa.RecordBatch], pa.Array]
) -> tuple[int, pa.Table | None]:
    """How many rows match `where`, and the first `EXAMPLES` of them."""
    count = 0
    head: list[pa.RecordBatch] = []
    for batch in batches:
        found = batch.filter(where(batch))
        count += found.num_rows
        if found.num_rows and sum(part.num_rows for part in head) < EXAMPLES:
            head.append(found.slice(0, EXAMPLES))
    return count, pa.Table.from_batches(head).slice(0, EXAMPLES) if head else None


def _examples(head: pa.Table | None) -> str:
    if head is None:
        return ""
    pairs = zip(head["row_id"].to_pylist(), head["error"].to_pylist(), strict=True)
    return "; ".join(f"{row_id}: {error}" for row_id, error in pairs)


def repeated_values(values: Iterable[pa.Array]) -> tuple[int, list[str]]:
    """How many distinct non-null strings occur more than once, and the first few, sorted.

    The values seen are kept in a temporary SQLite index with a bounded page cache, not
    in memory, so a column of any length is checked exactly in constant memory.

    >>> repeated_values([pa.array(["a", "b", None]), pa.array(["b", None, "c", "b"])])
    (1, ['b'])
    """
    schema = "CREATE TABLE seen (value TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID"
    with ScratchDatabase("repeats", schema) as db:
        for array in values:
            db.write_many(
                "INSERT INTO seen (value, n) VALUES (?, 1) "
                "ON CONFLICT (value) DO UPDATE SET n = n + 1",
                ((value,) for value in array.drop_null().to_pylist()),
            )
        (repeated,) = db.execute("SELECT count(*) FROM seen WHERE n > 1").fetchone()
        first = db.execute(
            "SELECT value FROM seen WHERE n > 1 ORDER BY value LIMIT ?", (EXAMPLES,)
        ).fetchall()
    return int(repeated), [value for (value,) in first]


def _all_valid_rows_completed(storage: Flux2Storage, key: str) -> AssetCheckResult:
    batches = _results(storage, key, ["row_id", "status", "error"])
    unfinished, head = _matching(
        batches,
        lambda batch: pc.and_(
            pc.not_equal(batch["status"], "completed"),
            pc.not_equal(batch["status"], "invalid"),
        ),
    )
    return AssetCheckResult(
        passed=unfinished == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={"not_completed": unfinished, "examples": _examples(head)},
    )


def _request_ids_unique(storage: Flux2Storage, key: str) -> AssetCheckResult:
    batches = _results(storage, key, ["request_id"])
    repeated, first = repeated_values(batch["request_id"] for batch in batches)
    return AssetCheckResult(
        passed=repeated == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={"repeated": repeated, "examples": ", ".join(first)},
    )


def _no_invalid_rows(storage: Flux2Storage, key: str) -> AssetCheckResult:
    batches = _results(storage, key, ["row_id", "status", "error"])
    invalid, head = _matching(batches, lambda batch: pc.equal(batch["status"], "invalid"))
    return AssetCheckResult(
        passed=invalid == 0,
        severity=AssetCheckSeverity.WARN,
        metadata={"invalid_rows": invalid, "examples": _examples(head)},
    )


def _completed_rows_have_all_images(storage: Flux2Storage, key: str) -> AssetCheckResult:
    batches = _results(storage, key, ["row_id", "status", "num_images", "output_urls"])
    short, head = _matching(
        batches,
        lambda batch: pc.and_(
            pc.equal(batch["status"], "completed"),
            pc.not_equal(pc.list_value_length(batch["output_urls"]), batch["num_images"]),
        ),
    )
    examples = head["row_id"].to_pylist() if head is not None else []
    return AssetCheckResult(
        passed=short == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={"rows_missing_images": short, "examples": ", ".join(examples)},
    )


@dataclass(frozen=True)
class EditsCheck:
    """One check on a partition's results file: its name, what it says, how it is evaluated."""

    name: str
    description: str
    evaluate: Callable[[Flux2Storage, str], AssetCheckResult]
    blocking: bool = False
    """A failure stops the assets downstream (flux2_images) from running on the partition."""


EDITS_CHECKS: tuple[EditsCheck, ...] = (
    EditsCheck(
        "all_valid_rows_completed",
        "Every row that passed validation completed (ERROR).",
        _all_valid_rows_completed,
        blocking=True,
    ),
    EditsCheck(
        "request_ids_unique",
        "No request_id appears on two rows: no job was paid for twice (ERROR).",
        _request_ids_unique,
        blocking=True,
    ),
    EditsCheck(
        "no_invalid_rows",
        "Reports rows that break the input schema, with the reason (WARN).",
        _no_invalid_rows,
    ),
    EditsCheck(
        "completed_rows_have_all_images",
        "Every completed row has num_images output URLs (ERROR).",
        _completed_rows_have_all_images,
        blocking=True,
    ),
)


def edits_check_specs(
    keys: Flux2Keys, partitions_def: DynamicPartitionsDefinition
) -> list[AssetCheckSpec]:
    """The specs of the checks `flux2_edits` evaluates in its own step, one per partition."""
    return [
        AssetCheckSpec(
            check.name,
            asset=keys.edits,
            description=check.description,
            partitions_def=partitions_def,
            blocking=check.blocking,
        )
        for check in EDITS_CHECKS
    ]


def evaluate_edits_checks(
    storage: Flux2Storage, asset_key: AssetKey, key: str, names: Collection[str]
) -> list[AssetCheckResult]:
    """The results of the checks `names` on partition `key`'s results file, in `EDITS_CHECKS` order.

    Raises the error of a results file that cannot be read (it names the file).

    Example::

        [result] = evaluate_edits_checks(storage, keys.edits, "cats", {"no_invalid_rows"})
        result.passed, result.metadata["invalid_rows"]
    """
    return [
        _for_check(check.evaluate(storage, key), asset_key, check.name)
        for check in EDITS_CHECKS
        if check.name in names
    ]


def _for_check(result: AssetCheckResult, asset_key: AssetKey, name: str) -> AssetCheckResult:
    # A step that evaluates several checks must name the check each result belongs to.
    return AssetCheckResult(
        passed=result.passed,
        asset_key=asset_key,
        check_name=name,
        metadata=result.metadata,
        severity=result.severity,
        description=result.description,
    )
