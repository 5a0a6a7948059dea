"""Asset checks on `flux2_edits`, each read back from the written results file.

Example: in the Dagster UI each partition of flux2_edits shows these four checks;
`flux2-pipeline materialize` runs them right after the asset.
"""

from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    asset_check,
)

from flux2_pipeline.assets.prompts import prompt_table_partitions
from flux2_pipeline.paths import read_parquet
from flux2_pipeline.resources import Flux2Storage

EDITS = "flux2_edits"
EXAMPLES = 5


def _results(storage: Flux2Storage, key: str, columns: Sequence[str]) -> pa.Table:
    return read_parquet(storage.results_path(key), columns=columns)


def _examples(table: pa.Table) -> str:
    head = table.slice(0, EXAMPLES)
    pairs = zip(head["row_id"].to_pylist(), head["error"].to_pylist(), strict=True)
    return "; ".join(f"{row_id}: {error}" for row_id, error in pairs)


@asset_check(
    asset=EDITS,
    name="all_valid_rows_completed",
    partitions_def=prompt_table_partitions,
    description="Every row that passed validation completed (ERROR).",
)
def all_valid_rows_completed(
    context: AssetCheckExecutionContext, storage: Flux2Storage
) -> AssetCheckResult:
    table = _results(storage, context.partition_key, ["row_id", "status", "error"])
    status = table["status"]
    unfinished = table.filter(
        pc.and_(pc.not_equal(status, "completed"), pc.not_equal(status, "invalid"))
    )
    return AssetCheckResult(
        passed=unfinished.num_rows == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={"not_completed": unfinished.num_rows, "examples": _examples(unfinished)},
    )


@asset_check(
    asset=EDITS,
    name="request_ids_unique",
    partitions_def=prompt_table_partitions,
    description="No request_id appears on two rows: no job was paid for twice (ERROR).",
)
def request_ids_unique(
    context: AssetCheckExecutionContext, storage: Flux2Storage
) -> AssetCheckResult:
    table = _results(storage, context.partition_key, ["request_id"])
    counts = Counter(rid for rid in table["request_id"].to_pylist() if rid is not None)
    repeated = sorted(rid for rid, n in counts.items() if n > 1)
    return AssetCheckResult(
        passed=not repeated,
        severity=AssetCheckSeverity.ERROR,
        metadata={"repeated": len(repeated), "examples": ", ".join(repeated[:EXAMPLES])},
    )


@asset_check(
    asset=EDITS,
    name="no_invalid_rows",
    partitions_def=prompt_table_partitions,
    description="Reports rows that break the input schema, with the reason (WARN).",
)
def no_invalid_rows(context: AssetCheckExecutionContext, storage: Flux2Storage) -> AssetCheckResult:
    table = _results(storage, context.partition_key, ["row_id", "status", "error"])
    invalid = table.filter(pc.equal(table["status"], "invalid"))
    return AssetCheckResult(
        passed=invalid.num_rows == 0,
        severity=AssetCheckSeverity.WARN,
        metadata={"invalid_rows": invalid.num_rows, "examples": _examples(invalid)},
    )


@asset_check(
    asset=EDITS,
    name="completed_rows_have_all_images",
    partitions_def=prompt_table_partitions,
    description="Every completed row has num_images output URLs (ERROR).",
)
def completed_rows_have_all_images(
    context: AssetCheckExecutionContext, storage: Flux2Storage
) -> AssetCheckResult:
    table = _results(
        storage, context.partition_key, ["row_id", "status", "num_images", "output_urls"]
    )
    completed = table.filter(pc.equal(table["status"], "completed"))
    found = pc.list_value_length(completed["output_urls"])
    short = completed.filter(pc.not_equal(found, completed["num_images"]))
    return AssetCheckResult(
        passed=short.num_rows == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "rows_missing_images": short.num_rows,
            "examples": ", ".join(short["row_id"].to_pylist()[:EXAMPLES]),
        },
    )


EDITS_CHECKS: list[AssetChecksDefinition] = [
    all_valid_rows_completed,
    request_ids_unique,
    no_invalid_rows,
    completed_rows_have_all_images,
]
